//! One shared copy of each description text: what agents describe is mostly
//! the same on thousands of servers (OS, CPU, GPU, versions, tag keys and
//! most tag values), so a large fleet pays for its unique texts only.

use std::sync::Arc;

use super::{
    model::FastSet,
    model::{ServerDescription, Text},
};

/// The shared texts. Texts no record uses any more are dropped from time
/// to time, so the set follows the fleet instead of its history.
#[derive(Debug, Default)]
pub(super) struct Interner {
    texts: FastSet<Text>,
    /// Texts added since the last purge.
    added: usize,
}

impl Interner {
    /// Replaces `text` by the shared copy, making it the shared copy if it
    /// is the first.
    fn share(&mut self, text: &mut Text) {
        match self.texts.get(&**text) {
            Some(shared) => *text = shared.clone(),
            None => {
                self.texts.insert(text.clone());
                self.added += 1;
            }
        }
    }

    /// Makes `description` use shared texts and exactly sized lists (a
    /// decoded list keeps the spare room its decoding grew).
    pub(super) fn description(&mut self, d: &mut ServerDescription) {
        self.purge_if_due();
        // Addresses, names and the instance id are unique to a server:
        // sharing them would only add a set entry each. An endpoint's
        // address is usually the server's own.
        for endpoint in &mut d.endpoints {
            if endpoint.ip_address == d.ip {
                endpoint.ip_address = d.ip.clone();
            }
            self.share(&mut endpoint.web_url_path);
        }
        d.endpoints.shrink_to_fit();
        self.share(&mut d.version);
        self.share(&mut d.agent_version);
        let host = &mut d.host;
        for text in [
            &mut host.os.name,
            &mut host.os.version,
            &mut host.os.kernel_version,
            &mut host.os.build_number,
            &mut host.cpu_info.vendor,
            &mut host.cpu_info.model_name,
            &mut host.cpu_info.architecture,
        ] {
            self.share(text);
        }
        if let Some(aws) = &mut host.aws {
            self.share(&mut aws.region);
            self.share(&mut aws.ec2_instance_type);
            self.share(&mut aws.ec2_image_id);
        }
        for gpu in &mut host.gpus {
            self.share(&mut gpu.vendor);
            self.share(&mut gpu.model_name);
        }
        host.gpus.shrink_to_fit();
        for tag in &mut d.tags {
            self.share(&mut tag.key);
            self.share(&mut tag.value);
        }
        d.tags.shrink_to_fit();
    }

    /// Drops the texts only the set holds, once enough were added since
    /// the last time for the walk over the set to be cheap per addition.
    fn purge_if_due(&mut self) {
        if self.added >= (self.texts.len() / 2).max(1024) {
            self.texts.retain(|text| Arc::strong_count(text) > 1);
            self.added = 0;
        }
    }

    /// How many texts are shared.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.texts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo;

    #[test]
    fn equal_texts_are_one_allocation_and_unique_ones_stay_apart() {
        let mut interner = Interner::default();
        let mut a = demo::description(1);
        let mut b = demo::description(2);
        interner.description(&mut a);
        interner.description(&mut b);
        assert!(Arc::ptr_eq(&a.version, &b.version));
        assert!(Arc::ptr_eq(
            &a.host.cpu_info.model_name,
            &b.host.cpu_info.model_name
        ));
        assert!(Arc::ptr_eq(&a.tags[0].key, &b.tags[0].key));
        assert!(Arc::ptr_eq(&a.endpoints[0].ip_address, &a.ip));
        assert!(!Arc::ptr_eq(&a.hostname, &b.hostname));
        assert_eq!(a, demo::description(1), "sharing changes no value");
        assert_eq!(b, demo::description(2));
        assert_eq!(a.tags.capacity(), a.tags.len());
    }

    #[test]
    fn texts_no_record_holds_are_purged() {
        let mut interner = Interner::default();
        let mut kept = demo::description(0);
        interner.description(&mut kept);
        let shared = interner.len();
        // Many servers with a unique tag value each, all dropped again.
        for i in 0..5000 {
            let mut d = demo::description(i);
            d.tags.push(crate::fleet::Tag {
                key: "asset".into(),
                value: format!("asset-{i}").into(),
            });
            interner.description(&mut d);
        }
        let mut last = demo::description(1);
        interner.description(&mut last);
        assert!(
            interner.len() < shared + 2 * 1024,
            "{} texts shared after the others were dropped",
            interner.len()
        );
        // What is still held survives every purge.
        assert!(interner.texts.contains(&*kept.version));
        assert!(Arc::strong_count(&kept.version) > 1);
    }
}
