//! GetSessionScreenshots: asks the agents of READY sessions for
//! screenshots, waits for their answers outside the fleet's lock, and
//! keeps the reply within what clients accept.
//!
//! Each item becomes a GET_SCREENSHOT instruction with a fresh id, sent on
//! its server's instruction stream; the id is remembered in a map of
//! pending screenshots (its own small lock, never held with the fleet's)
//! until the agent answers, the screenshot timeout passes, or the caller
//! goes away, whichever comes first. An answer is taken only from the
//! server the instruction went to; any other (unknown, late, or another
//! server's id) is accepted and ignored, like a late answer to a create.
//! Screenshots are never stored, and never sent again after a reconnect.

use std::{sync::Arc, time::Duration};

use tokio::{sync::oneshot, time::Instant};
use tracing::Instrument as _;

use crate::telemetry::otlp::TRACE_TARGET;

use super::{
    Instruction, SessionView,
    validate::{check_session_id, dedupe_ids},
};
use crate::fleet::{
    error::{AgentStep, FailureCode, FieldViolation, FleetError, ItemFailure},
    handle::Fleet,
    model::{PendingShot, PendingShots, ScreenshotAnswer, ScreenshotImage, ServerId, SessionState},
    validate::{agent_text, validate_batch_size_up_to, validate_server_id},
};

/// The most sessions one GetSessionScreenshots call may name: each costs
/// an agent a screenshot and the reply its images (DCV's own clients ask
/// for 5 at a time).
pub const MAX_SCREENSHOT_ITEMS: usize = 100;

/// The largest MaxWidth or MaxHeight, in pixels: a 4K display's width.
pub const MAX_SCREENSHOT_DIMENSION: u32 = 4096;

/// The most images one session's screenshot may hold (one per display).
pub const MAX_SCREENSHOT_IMAGES: usize = 16;

/// The most image data one GetSessionScreenshots reply carries, in bytes.
/// gRPC clients refuse replies over 4 MiB by default (grpc-go, grpc-java,
/// tonic, Python's grpcio), and a reply they refuse loses every
/// screenshot in it; 512 KiB is left for the rest of the reply (at most
/// 100 items' ids, failure reasons and image metadata, about 250 KiB).
pub const MAX_SCREENSHOT_REPLY_BYTES: usize = 4 * 1024 * 1024 - 512 * 1024;

/// The most image data one agent report may carry, in bytes: one
/// session's screenshot must fit in a reply on its own.
pub const MAX_SCREENSHOT_REPORT_BYTES: usize = MAX_SCREENSHOT_REPLY_BYTES;

/// What an image costs the reply besides its data (format, time, flags
/// and framing), counted against [`MAX_SCREENSHOT_REPLY_BYTES`].
const IMAGE_OVERHEAD_BYTES: usize = 64;

/// The longest instruction id an agent may echo, in bytes (the broker's
/// are 36-character UUIDs).
pub const MAX_INSTRUCTION_ID_BYTES: usize = 128;

/// What DCV answers for an unknown session in this API (its other APIs
/// say [`super::SESSION_NOT_FOUND_TEXT`]).
pub const SCREENSHOT_SESSION_NOT_FOUND_TEXT: &str = "Dcv session not found.";

/// A GetSessionScreenshots item as the caller sent it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScreenshotItem {
    /// Session id.
    pub session_id: String,
    /// The most pixels wide (`None`: the broker's default).
    pub max_width: Option<i32>,
    /// The most pixels high (`None`: the broker's default).
    pub max_height: Option<i32>,
}

/// One GetSessionScreenshots item's outcome, in request order.
pub type ScreenshotResult = Result<Vec<ScreenshotImage>, ItemFailure>;

/// Removes its ids from the pending map when dropped: when the answers
/// came, when the timeout passed, or when the caller went away and the
/// request's future was dropped mid-wait.
struct PendingGuard<'a> {
    pending: &'a PendingShots,
    ids: Vec<Arc<str>>,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let mut pending = self.pending.lock();
        for id in &self.ids {
            pending.remove(id);
        }
    }
}

/// Checks an item's size field: absent, or 1 to the maximum.
fn dimension(
    field: String,
    value: Option<i32>,
    default: u32,
    violations: &mut Vec<FieldViolation>,
) -> u32 {
    match value {
        None => default,
        Some(n) => match u32::try_from(n) {
            Ok(n) if (1..=MAX_SCREENSHOT_DIMENSION).contains(&n) => n,
            _ => {
                violations.push(FieldViolation::new(
                    field,
                    format!("must be 1 to {MAX_SCREENSHOT_DIMENSION}; got {n}"),
                ));
                default
            }
        },
    }
}

/// Checks an agent's screenshot: 1 to [`MAX_SCREENSHOT_IMAGES`] images,
/// [`MAX_SCREENSHOT_REPORT_BYTES`] of data in all, none empty.
pub fn check_screenshot(images: &[ScreenshotImage]) -> Result<(), FleetError> {
    let mut violations = Vec::new();
    if images.is_empty() || images.len() > MAX_SCREENSHOT_IMAGES {
        violations.push(FieldViolation::new(
            "Images",
            format!(
                "a successful screenshot holds 1 to {MAX_SCREENSHOT_IMAGES} images; got {}",
                images.len()
            ),
        ));
    }
    let total: usize = images.iter().map(|i| i.data.len()).sum();
    if total > MAX_SCREENSHOT_REPORT_BYTES {
        violations.push(FieldViolation::new(
            "Images",
            format!("at most {MAX_SCREENSHOT_REPORT_BYTES} bytes of image data; got {total}"),
        ));
    }
    for (i, image) in images.iter().enumerate() {
        if image.data.is_empty() {
            violations.push(FieldViolation::new(
                format!("Images[{i}].Data"),
                "must not be empty",
            ));
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(FleetError::InvalidArgument(violations))
    }
}

/// What an item will wait for, once its instruction is sent.
enum Slot {
    Failed(ItemFailure),
    Waiting(ServerId, oneshot::Receiver<ScreenshotAnswer>),
}

impl Fleet {
    /// Takes screenshots of READY sessions through their agents; one
    /// result per item, in order. Waits at most the screenshot timeout,
    /// never under the fleet's lock.
    pub async fn get_session_screenshots(
        &self,
        items: &[ScreenshotItem],
    ) -> Result<Vec<ScreenshotResult>, FleetError> {
        validate_batch_size_up_to("Sessions", items.len(), MAX_SCREENSHOT_ITEMS)?;
        let config = &self.config;
        let mut violations = Vec::new();
        let sizes: Vec<(u32, u32)> = items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                (
                    dimension(
                        format!("Sessions[{i}].MaxWidth"),
                        item.max_width,
                        config.screenshot_max_width,
                        &mut violations,
                    ),
                    dimension(
                        format!("Sessions[{i}].MaxHeight"),
                        item.max_height,
                        config.screenshot_max_height,
                        &mut violations,
                    ),
                )
            })
            .collect();
        if !violations.is_empty() {
            return Err(FleetError::InvalidArgument(violations));
        }
        let pre = dedupe_ids(items.iter().map(|i| i.session_id.as_str()));
        let mut guard = PendingGuard {
            pending: &self.screenshots,
            ids: Vec::with_capacity(items.len()),
        };
        let slots = self.send_screenshot_instructions(items, &sizes, pre, &mut guard);
        // Every instruction is out before the first wait: the agents work
        // at once, and one deadline bounds the whole call.
        let deadline = Instant::now() + config.screenshot_timeout;
        let mut answers = Vec::with_capacity(slots.len());
        for slot in slots {
            answers.push(match slot {
                Slot::Failed(failure) => Err(failure),
                Slot::Waiting(server, answer) => {
                    // From the instruction's sending, not from this wait.
                    let round_trip =
                        tracing::info_span!(target: TRACE_TARGET, "agent round trip", server = %server);
                    let answer = tokio::time::timeout_at(deadline, answer).instrument(round_trip);
                    match answer.await {
                        Ok(Ok(Ok(images))) => Ok(images),
                        Ok(Ok(Err(why))) => Err(ItemFailure::new(
                            FailureCode::AgentFailed,
                            format!("The agent of server {server} could not take it: {why}"),
                        )),
                        Ok(Err(_)) | Err(_) => Err(unanswered(&server, config.screenshot_timeout)),
                    }
                }
            });
        }
        drop(guard);
        Ok(within_reply_budget(items, answers))
    }

    /// Sends one GET_SCREENSHOT per item that can have one, under a read
    /// lock (sending on a channel is all it does per item).
    fn send_screenshot_instructions(
        &self,
        items: &[ScreenshotItem],
        sizes: &[(u32, u32)],
        pre: Vec<Option<ItemFailure>>,
        guard: &mut PendingGuard<'_>,
    ) -> Vec<Slot> {
        let now = Instant::now();
        let state = self.read(now);
        let mut slots = Vec::with_capacity(items.len());
        for ((item, &(max_width, max_height)), pre) in items.iter().zip(sizes).zip(pre) {
            if let Some(failure) = pre {
                slots.push(Slot::Failed(failure));
                continue;
            }
            let Some(record) = state
                .sessions
                .records
                .get(item.session_id.as_str())
                .filter(|r| r.state != SessionState::Deleted)
            else {
                slots.push(Slot::Failed(ItemFailure::new(
                    FailureCode::SessionNotFound,
                    SCREENSHOT_SESSION_NOT_FOUND_TEXT,
                )));
                continue;
            };
            let view = SessionView::new(record, &state.servers, now, self.config.unreachable_after);
            let (SessionState::Ready, Some(server)) = (view.shown_state(), view.server) else {
                slots.push(Slot::Failed(ItemFailure::new(
                    FailureCode::SessionNotReady,
                    format!("The session is not READY (it is {:?}).", view.shown_state()),
                )));
                continue;
            };
            let Some(agent) = state
                .sessions
                .agents
                .get(&server.id)
                .filter(|a| !a.is_closed())
            else {
                slots.push(Slot::Failed(no_stream(&server.id)));
                continue;
            };
            let id: Arc<str> = Arc::from(uuid::Uuid::new_v4().to_string());
            let (tx, rx) = oneshot::channel();
            // In the map before the agent can see the instruction, so that
            // even the fastest answer finds its waiter.
            self.screenshots.lock().insert(
                id.clone(),
                PendingShot {
                    server: server.id.clone(),
                    answer: tx,
                },
            );
            guard.ids.push(id.clone());
            let sent = agent.send(Instruction::GetScreenshot {
                server: server.id.clone(),
                session: record.id.clone(),
                id,
                max_width,
                max_height,
                format: self.config.screenshot_format,
            });
            slots.push(match sent {
                Ok(()) => Slot::Waiting(server.id.clone(), rx),
                Err(_) => Slot::Failed(no_stream(&server.id)),
            });
        }
        slots
    }

    /// Takes an agent's answer to GET_SCREENSHOT `instruction_id`. Only the
    /// server the instruction went to can answer it; any other answer
    /// (unknown, late, or another server's id) is accepted and ignored.
    pub fn report_screenshot(
        &self,
        server: &str,
        session: &str,
        instruction_id: &str,
        answer: ScreenshotAnswer,
    ) -> Result<(), FleetError> {
        let mut violations = Vec::new();
        if let Err(why) = validate_server_id(server) {
            violations.push(FieldViolation::new("ServerId", why));
        }
        if !session.is_empty()
            && let Err(why) = check_session_id(session)
        {
            violations.push(FieldViolation::new("SessionId", why));
        }
        if instruction_id.is_empty() {
            violations.push(FieldViolation::new(
                "InstructionId",
                "is required for GET_SCREENSHOT: echo the instruction's InstructionId",
            ));
        } else if instruction_id.len() > MAX_INSTRUCTION_ID_BYTES {
            violations.push(FieldViolation::new(
                "InstructionId",
                format!(
                    "must be at most {MAX_INSTRUCTION_ID_BYTES} bytes; got {}",
                    instruction_id.len()
                ),
            ));
        }
        if let Ok(images) = &answer
            && let Err(FleetError::InvalidArgument(more)) = check_screenshot(images)
        {
            violations.extend(more);
        }
        if !violations.is_empty() {
            return Err(FleetError::InvalidArgument(violations));
        }
        if !self.state.read().servers.contains_key(server) {
            return Err(FleetError::ServerNotFound(
                server.to_string(),
                AgentStep::ReportInstructionResult,
            ));
        }
        let answer = answer.map_err(|why| agent_text(&why));
        let mut pending = self.screenshots.lock();
        if pending
            .get(instruction_id)
            .is_some_and(|p| &*p.server == server)
            && let Some(shot) = pending.remove(instruction_id)
        {
            drop(pending);
            // The caller may have gone this instant: nothing to do then.
            let _ = shot.answer.send(answer);
        }
        Ok(())
    }

    /// How many screenshots wait for their agents now.
    pub fn pending_screenshots(&self) -> usize {
        self.screenshots.lock().len()
    }
}

fn no_stream(server: &ServerId) -> ItemFailure {
    ItemFailure::new(
        FailureCode::AgentUnavailable,
        format!("The agent of server {server} has no open instruction stream."),
    )
}

fn unanswered(server: &ServerId, timeout: Duration) -> ItemFailure {
    ItemFailure::new(
        FailureCode::AgentUnavailable,
        format!(
            "The agent of server {server} did not answer within {}.",
            humantime::format_duration(timeout)
        ),
    )
}

/// Fails, with REPLY_SIZE_LIMIT, every screenshot that would take the
/// reply past [`MAX_SCREENSHOT_REPLY_BYTES`] after the ones before it.
fn within_reply_budget(
    items: &[ScreenshotItem],
    answers: Vec<ScreenshotResult>,
) -> Vec<ScreenshotResult> {
    let mut used = 0usize;
    items
        .iter()
        .zip(answers)
        .map(|(item, answer)| {
            let images = answer?;
            let cost = item.session_id.len()
                + images
                    .iter()
                    .map(|i| i.data.len() + IMAGE_OVERHEAD_BYTES)
                    .sum::<usize>();
            if used + cost > MAX_SCREENSHOT_REPLY_BYTES {
                return Err(ItemFailure::new(
                    FailureCode::ReplySizeLimit,
                    format!(
                        "The screenshots before it fill this reply ({MAX_SCREENSHOT_REPLY_BYTES} \
                         bytes at most); ask for this session in another call."
                    ),
                ));
            }
            used += cost;
            Ok(images)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::fleet::{model::ImageFormat, validate::MAX_AGENT_REASON_CHARS};

    fn image(bytes: usize) -> ScreenshotImage {
        ScreenshotImage {
            format: ImageFormat::Png,
            data: vec![1; bytes],
            created_at: SystemTime::UNIX_EPOCH,
            primary: true,
        }
    }

    #[test]
    fn the_budget_fails_items_past_it_and_keeps_later_small_ones() {
        let items: Vec<ScreenshotItem> = (0..3)
            .map(|i| ScreenshotItem {
                session_id: format!("s{i}"),
                ..Default::default()
            })
            .collect();
        let big = MAX_SCREENSHOT_REPLY_BYTES / 2 + 1;
        let results = within_reply_budget(
            &items,
            vec![
                Ok(vec![image(big)]),
                Ok(vec![image(big)]),
                Ok(vec![image(10)]),
            ],
        );
        assert!(results[0].is_ok());
        assert_eq!(
            results[1].as_ref().unwrap_err().code,
            FailureCode::ReplySizeLimit
        );
        assert!(results[2].is_ok());
    }

    #[test]
    fn agent_text_drops_control_characters_and_is_bounded() {
        assert_eq!(agent_text("no\x1b[31m red\nline"), "no[31m redline");
        assert_eq!(
            agent_text(&"x".repeat(5000)).chars().count(),
            MAX_AGENT_REASON_CHARS
        );
    }

    #[test]
    fn a_report_must_hold_images_within_bounds() {
        assert!(check_screenshot(&[]).is_err());
        assert!(check_screenshot(&[image(1)]).is_ok());
        assert!(check_screenshot(&vec![image(1); MAX_SCREENSHOT_IMAGES + 1]).is_err());
        assert!(check_screenshot(&[image(MAX_SCREENSHOT_REPORT_BYTES + 1)]).is_err());
        assert!(check_screenshot(&[image(0)]).is_err());
    }
}
