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
