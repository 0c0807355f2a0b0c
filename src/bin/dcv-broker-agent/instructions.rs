//! Carrying out the broker's instructions: each in its own task, one at a
//! time per session, create and delete journalled before they are reported
//! (a re-sent id is reported again, never run again), and a create guarded
//! by reality too (a session `dcv` already shows is not created twice).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use dcv_broker::pb::{self, stream_instructions_response::Instruction};

use crate::{
    dcv::{self, Dcv, DcvSession, Folders, PrivateFile},
    observe::Observer,
    state::{Journal, Outcome},
};

/// Carries out instructions.
#[derive(Debug)]
pub struct Executor {
    dcv: Dcv,
    folders: Folders,
    /// Where permissions files live while `dcv` reads them (inside the
    /// 0700 state directory).
    scratch: PathBuf,
    journal: Arc<Mutex<Journal>>,
    observer: Arc<Observer>,
    per_session: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// The result of one instruction, as ReportInstructionResult carries it
/// (without the server id).
pub type Report = pb::ReportInstructionResultRequest;

impl Executor {
    pub fn new(
        dcv: Dcv,
        folders: Folders,
        scratch: PathBuf,
        journal: Arc<Mutex<Journal>>,
        observer: Arc<Observer>,
    ) -> Executor {
        Executor {
            dcv,
            folders,
            scratch,
            journal,
            observer,
            per_session: Mutex::new(HashMap::new()),
        }
    }

    fn session_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.per_session.lock().unwrap_or_else(|p| p.into_inner());
        // Locks nobody holds or waits for are dropped as we go.
        map.retain(|_, l| Arc::strong_count(l) > 1);
        map.entry(id.to_owned()).or_default().clone()
    }

    /// Carries out one instruction; the report to send, or None for an
    /// instruction without a body.
    pub async fn carry_out(&self, message: pb::StreamInstructionsResponse) -> Option<Report> {
        let id = message.instruction_id.clone();
        let instruction = message.instruction?;
        let (kind, session) = match &instruction {
            Instruction::CreateSession(c) => (pb::InstructionKind::CreateSession, &c.session_id),
            Instruction::DeleteSession(d) => (pb::InstructionKind::DeleteSession, &d.session_id),
            Instruction::UpdatePermissions(u) => {
                (pb::InstructionKind::UpdatePermissions, &u.session_id)
            }
            Instruction::GetScreenshot(g) => (pb::InstructionKind::GetScreenshot, &g.session_id),
        };
        let session = session.clone();
        let lock = self.session_lock(&session);
        let _turn = lock.lock().await;
        let mut report = Report {
            session_id: session.clone(),
            kind: kind as i32,
            instruction_id: id.clone(),
            ..Default::default()
        };
        let journalled = matches!(
            kind,
            pb::InstructionKind::CreateSession | pb::InstructionKind::DeleteSession
        );
        if journalled && !id.is_empty() {
            let known = self.journal_lock().get(&id).cloned();
            if let Some(done) = known {
                tracing::info!(
                    "instruction {id} {} session={session} already done, reporting again",
                    kind.as_str_name()
                );
                return Some(fill(report, kind, done.success, done.reason));
            }
        }
        let result = match instruction {
            Instruction::CreateSession(c) => self.create(&c).await,
            Instruction::DeleteSession(_) => self.delete(&session).await,
            Instruction::UpdatePermissions(u) => self.permissions(&u).await,
            Instruction::GetScreenshot(g) => match self.screenshot(&g).await {
                Ok(images) => {
                    report.images = images;
                    Ok(())
                }
                Err(e) => Err(e),
            },
        };
        let (success, reason) = match result {
            Ok(()) => (true, String::new()),
            Err(reason) => (false, reason),
        };
        if journalled && !id.is_empty() {
            let outcome = Outcome {
                id: id.clone(),
                kind: kind.as_str_name().to_owned(),
                session: session.clone(),
                success,
                reason: reason.clone(),
            };
            let journal = self.journal.clone();
            let recorded = tokio::task::spawn_blocking(move || {
                journal
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(outcome)
            })
            .await;
            match recorded {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("cannot journal instruction {id}: {e}"),
                Err(e) => tracing::error!("cannot journal instruction {id}: {e}"),
            }
        }
        if success {
            tracing::info!(
                "instruction {id} {} session={session} done",
                kind.as_str_name()
            );
        } else {
            tracing::warn!(
                "instruction {id} {} session={session} failed: {reason}",
                kind.as_str_name()
            );
        }
        Some(fill(report, kind, success, reason))
    }

    fn journal_lock(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn create(&self, c: &pb::CreateSessionInstruction) -> Result<(), String> {
        // Reality first: after a crash between running and journalling,
        // the session runs already.
        match self.dcv.describe_session(&c.session_id).await {
            Ok(Some(existing)) => {
                self.observer.created(existing);
                return Ok(());
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        let permissions = if c.permissions_file.is_empty() {
            None
        } else {
            let bytes = dcv::decode_permissions(&c.permissions_file)?;
            Some(
                PrivateFile::write(&self.scratch, &bytes)
                    .map_err(|e| format!("cannot write the permissions file: {e}"))?,
            )
        };
        let args = dcv::create_session_argv(
            c,
            &self.folders,
            permissions.as_ref().map(PrivateFile::path),
        )?;
        self.dcv.run(&args).await.map_err(|e| e.to_string())?;
        let kind = pb::SessionType::try_from(c.r#type).unwrap_or(pb::SessionType::Virtual);
        self.observer.created(DcvSession {
            id: c.session_id.clone(),
            owner: c.owner.clone(),
            name: c.name.clone(),
            kind,
            num_of_connections: Some(0),
            creation_time: Some(std::time::SystemTime::now()),
            last_disconnection_time: None,
        });
        Ok(())
    }

    async fn delete(&self, session: &str) -> Result<(), String> {
        match self.dcv.close_session(session).await {
            Ok(()) => {}
            // Closing a session that is not there is done already.
            Err(e @ dcv::DcvError::Failed { .. }) => match self.dcv.describe_session(session).await
            {
                Ok(None) => {}
                _ => return Err(e.to_string()),
            },
            Err(e) => return Err(e.to_string()),
        }
        self.observer.deleted(session);
        Ok(())
    }

    async fn permissions(&self, u: &pb::UpdatePermissionsInstruction) -> Result<(), String> {
        let bytes = dcv::decode_permissions(&u.permissions_file)?;
        let file = PrivateFile::write(&self.scratch, &bytes)
            .map_err(|e| format!("cannot write the permissions file: {e}"))?;
        self.dcv
            .set_permissions(&u.session_id, file.path())
            .await
            .map_err(|e| e.to_string())
    }

    async fn screenshot(
        &self,
        g: &pb::GetScreenshotInstruction,
    ) -> Result<Vec<pb::SessionScreenshotImage>, String> {
        self.dcv
            .get_screenshot(&g.session_id, g.max_width, g.max_height, &g.format)
            .await
            .map_err(|e| e.to_string())
    }
}

fn fill(mut report: Report, kind: pb::InstructionKind, success: bool, reason: String) -> Report {
    report.success = success;
    report.failure_reason = reason;
    if success && kind == pb::InstructionKind::CreateSession {
        report.session_state = pb::SessionState::Ready as i32;
    }
    report
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::PermissionsExt, time::Duration};

    use super::*;
    use crate::state::StateDir;

    /// A `dcv` that records its calls and keeps sessions as files.
    const FAKE: &str = "#!/bin/sh\nD=\"$(dirname \"$0\")\"\necho \"$*\" >> \"$D/calls\"\n\
        case \"$1\" in\n  describe-session) [ -e \"$D/$2.s\" ] && echo \"{\\\"id\\\":\\\"$2\\\"}\" || { echo gone >&2; exit 1; } ;;\n  \
        create-session) for a; do l=\"$a\"; done; touch \"$D/$l.s\" ;;\n  close-session) rm \"$D/$2.s\" ;;\n  \
        list-sessions) echo '[]' ;;\nesac\n";

    fn setup(name: &str) -> (PathBuf, Executor) {
        let dir = std::env::temp_dir().join(format!("agent-exec-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let dcv_path = dir.join("dcv");
        std::fs::write(&dcv_path, FAKE).unwrap();
        std::fs::set_permissions(&dcv_path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let state = StateDir::open(&dir.join("state")).unwrap();
        let journal = Arc::new(Mutex::new(state.journal().unwrap()));
        let dcv = Dcv::new(dcv_path, Duration::from_secs(10));
        let observer = Arc::new(Observer::new(dcv.clone(), false, journal.clone()));
        let folders = Folders {
            init: dir.join("init"),
            autorun: dir.join("autorun"),
        };
        let executor = Executor::new(dcv, folders, dir.join("state"), journal, observer);
        (dir, executor)
    }

    fn calls(dir: &std::path::Path, verb: &str) -> usize {
        std::fs::read_to_string(dir.join("calls"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(verb))
            .count()
    }

    fn create(id: &str, session: &str) -> pb::StreamInstructionsResponse {
        pb::StreamInstructionsResponse {
            instruction_id: id.into(),
            instruction: Some(Instruction::CreateSession(pb::CreateSessionInstruction {
                session_id: session.into(),
                owner: "alice".into(),
                name: "n".into(),
                r#type: pb::SessionType::Virtual as i32,
                ..Default::default()
            })),
        }
    }

    #[tokio::test]
    async fn a_journalled_instruction_is_reported_again_not_run_again() {
        let (dir, executor) = setup("journal");
        let first = executor.carry_out(create("i1", "s1")).await.unwrap();
        assert!(first.success, "{first:?}");
        assert_eq!(first.session_state, pb::SessionState::Ready as i32);
        assert_eq!(first.instruction_id, "i1");
        let again = executor.carry_out(create("i1", "s1")).await.unwrap();
        assert_eq!(again, first);
        assert_eq!(calls(&dir, "create-session"), 1);

        // Another instruction for a session dcv already runs (an agent
        // killed between running and journalling): not created twice.
        let other = executor.carry_out(create("i2", "s1")).await.unwrap();
        assert!(other.success);
        assert_eq!(calls(&dir, "create-session"), 1);

        // A delete, then the same delete re-sent.
        let delete = pb::StreamInstructionsResponse {
            instruction_id: "d1".into(),
            instruction: Some(Instruction::DeleteSession(pb::DeleteSessionInstruction {
                session_id: "s1".into(),
            })),
        };
        assert!(executor.carry_out(delete.clone()).await.unwrap().success);
        assert!(executor.carry_out(delete).await.unwrap().success);
        assert_eq!(calls(&dir, "close-session"), 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn an_instruction_naming_a_file_outside_its_folder_fails_without_running_dcv() {
        let (dir, executor) = setup("confine");
        let mut message = create("i1", "s1");
        if let Some(Instruction::CreateSession(c)) = message.instruction.as_mut() {
            c.init_file = "../../etc/shadow".into();
        }
        let report = executor.carry_out(message).await.unwrap();
        assert!(!report.success);
        assert!(report.failure_reason.contains("InitFile"), "{report:?}");
        assert_eq!(calls(&dir, "create-session"), 0);
        let _ = std::fs::remove_dir_all(dir);
    }
}
