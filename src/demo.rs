//! A simulated fleet for demos and load: in-process agents that register N
//! fake DCV servers (mixed OS and sizes, tags, some running sessions) and
//! keep them heartbeating. Every attribute is derived from the server's
//! index, so the same N gives the same fleet on every run.
//!
//! The first server's id is `serverId1`, the id in DCV's CloseServers
//! documentation example, so that example runs as written; the others are
//! `dcv-0000001`, `dcv-0000002`, ...
//!
//! The simulated agents also carry out the broker's instructions: they
//! create and delete sessions at once, report the outcome, and list the
//! sessions they run in their next heartbeats, so the whole session flow
//! runs end to end in one process. Asked for a screenshot, they answer with
//! a real PNG of a [`DISPLAY_WIDTH`] x [`DISPLAY_HEIGHT`] display scaled
//! down to fit the size asked for.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;
use tokio::task::JoinHandle;

use crate::fleet::{
    Fleet, Heartbeat, ImageFormat, Instruction, InstructionKind, InstructionOutcome, LoadAverage,
    OsFamily, ReportedSession, ScreenshotImage, ServerDescription, ServerId, SessionKind,
    SessionState,
};
use crate::sample::family;
pub use crate::sample::{description, tagged_description};
// The fleet's tests draw from the same generator by this path.
pub(crate) use crate::sample::mix;

/// What the simulated agents changed on the broker's instruction, by server
/// index: sessions they created, and built-in sessions they deleted.
#[derive(Debug, Default)]
struct Changes {
    created: HashMap<usize, Vec<ReportedSession>>,
    deleted: HashSet<String>,
}

type Created = Arc<Mutex<Changes>>;

/// The simulated displays' size, in pixels: what a screenshot is scaled
/// down from (never up).
pub const DISPLAY_WIDTH: u32 = 1280;
/// See [`DISPLAY_WIDTH`].
pub const DISPLAY_HEIGHT: u32 = 800;

/// The size of a screenshot of a [`DISPLAY_WIDTH`] x [`DISPLAY_HEIGHT`]
/// display that fits in `max_width` x `max_height`, keeping its aspect
/// ratio as DCV does.
pub fn screenshot_size(max_width: u32, max_height: u32) -> (u32, u32) {
    let (w, h) = (u64::from(DISPLAY_WIDTH), u64::from(DISPLAY_HEIGHT));
    let (mw, mh) = (u64::from(max_width.max(1)), u64::from(max_height.max(1)));
    // Scale by the tighter of the two bounds, in integers.
    let (width, height) = if mw * h <= mh * w {
        (mw.min(w), (h * mw.min(w)).div_ceil(w))
    } else {
        ((w * mh.min(h)).div_ceil(h), mh.min(h))
    };
    let fit = |n: u64, max: u64| u32::try_from(n.clamp(1, max)).unwrap_or(1);
    (fit(width, mw.min(w)), fit(height, mh.min(h)))
}

/// A PNG of the `index`-th server's simulated display, `width` x
/// `height`: a gradient in a colour of its own, so that two servers'
/// screenshots differ.
pub fn screenshot_png(index: usize, width: u32, height: u32) -> Result<Vec<u8>, String> {
    let hue = (mix(index, 15) % 256) as u8;
    let mut pixels = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..height {
        for x in 0..width {
            pixels.extend_from_slice(&[
                hue,
                (x * 255 / width.max(1)) as u8,
                (y * 255 / height.max(1)) as u8,
            ]);
        }
    }
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer
        .write_image_data(&pixels)
        .map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(out)
}

/// Servers whose heartbeats are applied under one lock hold: big enough to
/// be cheap, small enough not to stall readers.
const HEARTBEAT_CHUNK: usize = 1000;

/// The id of the `index`-th simulated server.
pub fn server_id(index: usize) -> String {
    if index == 0 {
        "serverId1".to_string()
    } else {
        format!("dcv-{index:07}")
    }
}

/// The index of a simulated server's id, if it is one.
pub fn index_of(id: &str) -> Option<usize> {
    if id == "serverId1" {
        return Some(0);
    }
    let index: usize = id.strip_prefix("dcv-")?.parse().ok()?;
    (index > 0 && server_id(index) == id).then_some(index)
}

/// The heartbeat the `index`-th simulated agent sends. About a quarter of
/// the servers run a session (never `serverId1`), a few report an unhealthy
/// DCV server, and some Windows hosts have an RDP user logged in.
pub fn heartbeat(index: usize) -> Heartbeat {
    let family = family(index);
    let busy = index != 0 && mix(index, 10).is_multiple_of(4);
    let sessions = if busy {
        vec![ReportedSession {
            id: format!("session-{index}"),
            owner: format!("user{}", mix(index, 11) % 500),
            kind: if family == OsFamily::Linux {
                SessionKind::Virtual
            } else {
                SessionKind::Console
            },
            state: SessionState::Ready,
            details: Default::default(),
        }]
    } else {
        Vec::new()
    };
    let rdp_user = family == OsFamily::Windows && !busy && mix(index, 12).is_multiple_of(5);
    let load = (mix(index, 13) % 400) as f32 / 100.0;
    Heartbeat {
        dcv_server_healthy: index == 0 || !mix(index, 14).is_multiple_of(50),
        logged_in_users: if rdp_user {
            vec!["Administrator".into()]
        } else {
            Vec::new()
        },
        sessions,
        cpu_load_average: Some(LoadAverage {
            one_minute: load,
            five_minutes: load,
            fifteen_minutes: load,
        }),
        memory: None,
        swap: None,
    }
}

/// Registers `count` simulated servers now, then keeps them heartbeating
/// at the fleet's heartbeat interval, spread evenly over it, and carries
/// out the broker's instructions. A server that was forgotten (its removal
/// timeout passed) registers again.
pub fn spawn(fleet: Fleet, count: usize) -> JoinHandle<()> {
    spawn_with(fleet, count, description)
}

/// [`spawn`], with the servers described by `describe` instead of
/// [`description`] (the load benchmark gives them more tags).
pub fn spawn_with(
    fleet: Fleet,
    count: usize,
    describe: fn(usize) -> ServerDescription,
) -> JoinHandle<()> {
    let ids: Vec<ServerId> = (0..count).map(|i| ServerId::from(server_id(i))).collect();
    for (index, id) in ids.iter().enumerate() {
        register(&fleet, index, id, describe);
    }
    let created: Created = Arc::default();
    let instructions = fleet.subscribe_instructions_many(&ids);
    let executor = tokio::spawn(execute(fleet.clone(), instructions, created.clone()));
    let beat = |index: usize, created: &Created| {
        let mut report = heartbeat(index);
        let changes = created.lock();
        report.sessions.retain(|s| !changes.deleted.contains(&s.id));
        if let Some(extra) = changes.created.get(&index) {
            report.sessions.extend(extra.iter().cloned());
        }
        report
    };
    fleet.heartbeat_many(
        ids.iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), beat(i, &created))),
    );
    tracing::info!(servers = count, "demo fleet registered");
    tokio::spawn(async move {
        // The executor lives as long as the heartbeats do.
        let _executor = AbortOnDrop(executor);
        let chunks = count.div_ceil(HEARTBEAT_CHUNK).max(1);
        let pause = fleet.config().heartbeat_interval / chunks as u32;
        let pause = pause.max(Duration::from_millis(1));
        loop {
            for (chunk_no, chunk) in ids.chunks(HEARTBEAT_CHUNK).enumerate() {
                tokio::time::sleep(pause).await;
                let base = chunk_no * HEARTBEAT_CHUNK;
                let unknown = fleet.heartbeat_many(
                    chunk
                        .iter()
                        .enumerate()
                        .map(|(i, id)| (id.clone(), beat(base + i, &created))),
                );
                for id in unknown {
                    if let Some(index) = index_of(&id) {
                        register(&fleet, index, &id, describe);
                    }
                }
            }
        }
    })
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Carries out instructions as a real agent would, instantly.
async fn execute(
    fleet: Fleet,
    mut instructions: tokio::sync::mpsc::UnboundedReceiver<Instruction>,
    created: Created,
) {
    while let Some(instruction) = instructions.recv().await {
        let server = instruction.server().clone();
        let Some(index) = index_of(&server) else {
            continue;
        };
        let (session, kind) = match instruction {
            Instruction::Create { session, order, .. } => {
                created
                    .lock()
                    .created
                    .entry(index)
                    .or_default()
                    .push(ReportedSession {
                        id: session.to_string(),
                        owner: order.owner.clone(),
                        kind: order.kind,
                        state: SessionState::Ready,
                        details: Default::default(),
                    });
                (session, InstructionKind::Create)
            }
            Instruction::Delete { session, .. } => {
                let mut changes = created.lock();
                let mut was_created = false;
                if let Some(list) = changes.created.get_mut(&index) {
                    let before = list.len();
                    list.retain(|s| *s.id != *session);
                    was_created = list.len() != before;
                }
                if !was_created {
                    // A built-in session deleted by the broker stays gone.
                    changes.deleted.insert(session.to_string());
                }
                drop(changes);
                (session, InstructionKind::Delete)
            }
            Instruction::UpdatePermissions { session, .. } => {
                (session, InstructionKind::UpdatePermissions)
            }
            Instruction::GetScreenshot {
                session,
                id,
                max_width,
                max_height,
                ..
            } => {
                // Always PNG, and said so in the answer's format, even
                // when JPEG was asked for: DCV's format is a preference.
                let (width, height) = screenshot_size(max_width, max_height);
                let answer = screenshot_png(index, width, height).map(|data| {
                    vec![ScreenshotImage {
                        format: ImageFormat::Png,
                        data,
                        created_at: std::time::SystemTime::now(),
                        primary: true,
                    }]
                });
                if let Err(err) = fleet.report_screenshot(&server, &session, &id, answer) {
                    tracing::debug!(%err, "demo agent screenshot refused");
                }
                continue;
            }
        };
        let outcome = InstructionOutcome::Done { ready: true };
        if let Err(err) = fleet.report_instruction(&server, &session, kind, outcome) {
            tracing::debug!(%err, "demo agent report refused");
        }
    }
}

fn register(fleet: &Fleet, index: usize, id: &str, describe: fn(usize) -> ServerDescription) {
    // Not waited for: the demo does not acknowledge anything to anyone.
    if let Err(err) = fleet
        .register_nowait(id, describe(index))
        .map(|(_, durable)| drop(durable))
    {
        tracing::warn!(server_id = %id, %err, "demo server refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn screenshots_fit_the_size_asked_for_and_keep_the_display_shape() {
        assert_eq!(screenshot_size(160, 100), (160, 100));
        assert_eq!(screenshot_size(64, 64), (64, 40));
        assert_eq!(screenshot_size(4096, 4096), (DISPLAY_WIDTH, DISPLAY_HEIGHT));
        assert_eq!(screenshot_size(4096, 80), (128, 80));
        assert_eq!(screenshot_size(1, 1), (1, 1));
    }

    #[test]
    fn a_screenshot_is_a_png_of_its_size() {
        let data = screenshot_png(3, 16, 10).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(data));
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (16, 10));
    }
}
