//! GetSessionScreenshots against a real broker on 127.0.0.1:0, with agents
//! driven by the test over the Agent API: the relay of GET_SCREENSHOT and
//! its answers by instruction id, every per-item failure code, the
//! request's and the report's bounds, the reply's size budget, and a
//! caller that goes away.

mod common;

use std::time::Duration;

use common::*;
use dcv_broker::{
    fleet::{
        FleetConfig,
        sessions::screenshots::{
            MAX_SCREENSHOT_IMAGES, MAX_SCREENSHOT_REPLY_BYTES, MAX_SCREENSHOT_REPORT_BYTES,
        },
    },
    pb::{self, FailureCode, InstructionKind as Kind, SessionState as St, SessionType as Ty},
};
use tonic::transport::Channel;

type Sessions = pb::sessions_client::SessionsClient<Channel>;

fn code(c: i32) -> FailureCode {
    FailureCode::try_from(c).unwrap()
}

fn with_fleet(fleet: FleetConfig) -> dcv_broker::BrokerConfig {
    dcv_broker::BrokerConfig {
        fleet,
        ..quiet_config()
    }
}

/// A broker whose screenshot timeout is `timeout`.
async fn broker_waiting(timeout: Duration) -> Broker {
    Broker::start(with_fleet(FleetConfig {
        screenshot_timeout: timeout,
        ..FleetConfig::default()
    }))
    .await
}

/// Creates a virtual session for `owner` on `agent`'s server and makes it
/// READY; returns its id.
async fn ready_session(sessions: &mut Sessions, agent: &mut TestAgent, owner: &str) -> String {
    let reply = sessions
        .create_sessions(create_req(vec![create_item("desk", owner, Ty::Virtual)]))
        .await
        .unwrap()
        .into_inner();
    let id = reply.successful_list[0].id.clone();
    let create = agent.next_create().await;
    assert_eq!(create.session_id, id);
    agent
        .report(&id, Kind::CreateSession, true, St::Ready)
        .await;
    id
}

fn item(id: &str) -> pb::GetSessionScreenshotRequestData {
    pb::GetSessionScreenshotRequestData {
        session_id: id.into(),
        ..Default::default()
    }
}

fn request(items: Vec<pb::GetSessionScreenshotRequestData>) -> pb::GetSessionScreenshotsRequest {
    pb::GetSessionScreenshotsRequest { sessions: items }
}

/// A PNG of `width` x `height`, one colour.
fn png(width: u32, height: u32, shade: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().unwrap();
    writer
        .write_image_data(&vec![shade; (width * height) as usize])
        .unwrap();
    writer.finish().unwrap();
    out
}

fn image(data: Vec<u8>) -> pb::SessionScreenshotImage {
    pb::SessionScreenshotImage {
        format: "png".into(),
        data,
        creation_time: Some(std::time::SystemTime::now().into()),
        primary: true,
    }
}

/// The size and first pixel of a PNG.
fn decode(data: &[u8]) -> (u32, u32, u8) {
    let decoder = png::Decoder::new(std::io::Cursor::new(data));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    (info.width, info.height, pixels[0])
}

/// Asks for screenshots in a task of its own, so that the test can play
/// the agent meanwhile.
fn ask(
    mut sessions: Sessions,
    items: Vec<pb::GetSessionScreenshotRequestData>,
) -> tokio::task::JoinHandle<Result<pb::GetSessionScreenshotsResponse, tonic::Status>> {
    tokio::spawn(async move {
        sessions
            .get_session_screenshots(request(items))
            .await
            .map(tonic::Response::into_inner)
    })
}

#[tokio::test]
async fn a_screenshot_comes_back_as_the_agents_png() {
    let broker = Broker::quiet().await;
    let mut agent = TestAgent::connect(&broker, registration("lin", "linux", 4)).await;
    let mut sessions = broker.sessions().await;
    let id = ready_session(&mut sessions, &mut agent, "alice").await;

    let call = ask(sessions.clone(), vec![item(&id)]);
    let (instruction_id, shot) = agent.next_screenshot().await;
    // The broker's defaults, DCV's: 160 x 100, PNG.
    assert_eq!(
        (shot.session_id.as_str(), shot.max_width, shot.max_height),
        (id.as_str(), 160, 100)
    );
    assert_eq!(shot.format, "png");
    assert_eq!(instruction_id.len(), 36, "a UUID: {instruction_id}");
    assert_eq!(broker.fleet.pending_screenshots(), 1);
    let data = png(160, 100, 77);
    agent
        .report_screenshot(&id, &instruction_id, Ok(vec![image(data.clone())]))
        .await
        .unwrap();

    let reply = call.await.unwrap().unwrap();
    assert!(reply.unsuccessful_list.is_empty(), "{reply:?}");
    let screenshot = reply.successful_list[0]
        .session_screenshot
        .as_ref()
        .unwrap();
    assert_eq!(screenshot.session_id, id);
    let got = &screenshot.images[0];
    assert_eq!(got.data, data, "the agent's bytes, as they were");
    assert_eq!(decode(&got.data), (160, 100, 77));
    assert_eq!(got.format, "png");
    assert!(got.primary);
    assert!(got.creation_time.is_some());
    assert_eq!(broker.fleet.pending_screenshots(), 0);

    // Sizes given by the caller reach the agent.
    let mut sized = item(&id);
    sized.max_width = Some(4096);
    sized.max_height = Some(1);
    let call = ask(sessions.clone(), vec![sized]);
    let (instruction_id, shot) = agent.next_screenshot().await;
    assert_eq!((shot.max_width, shot.max_height), (4096, 1));
    agent
        .report_screenshot(&id, &instruction_id, Ok(vec![image(png(1, 1, 5))]))
        .await
        .unwrap();
    assert_eq!(call.await.unwrap().unwrap().successful_list.len(), 1);
}

#[tokio::test]
async fn two_callers_of_one_session_each_get_their_own_screenshot() {
    let broker = Broker::quiet().await;
    let mut agent = TestAgent::connect(&broker, registration("lin", "linux", 4)).await;
    let mut sessions = broker.sessions().await;
    let id = ready_session(&mut sessions, &mut agent, "alice").await;

    let mut small = item(&id);
    small.max_width = Some(10);
    let mut large = item(&id);
    large.max_width = Some(20);
    let first = ask(sessions.clone(), vec![small]);
    let second = ask(sessions.clone(), vec![large]);
    let (id_a, shot_a) = agent.next_screenshot().await;
    let (id_b, shot_b) = agent.next_screenshot().await;
    assert_ne!(id_a, id_b);
    assert_eq!(broker.fleet.pending_screenshots(), 2);
    // Answered in reverse order, each with an image of the width asked.
    for (instruction_id, shot) in [(&id_b, &shot_b), (&id_a, &shot_a)] {
        let width = shot.max_width as u32;
        agent
            .report_screenshot(&id, instruction_id, Ok(vec![image(png(width, 1, 0))]))
            .await
            .unwrap();
    }
    let width_of = |reply: pb::GetSessionScreenshotsResponse| {
        decode(
            &reply.successful_list[0]
                .session_screenshot
                .as_ref()
                .unwrap()
                .images[0]
                .data,
        )
        .0
    };
    assert_eq!(width_of(first.await.unwrap().unwrap()), 10);
    assert_eq!(width_of(second.await.unwrap().unwrap()), 20);
}

#[tokio::test]
async fn an_agents_failure_is_agent_failed_with_its_reason_made_safe() {
    let broker = Broker::quiet().await;
    let mut agent = TestAgent::connect(&broker, registration("lin", "linux", 4)).await;
    let mut sessions = broker.sessions().await;
    let id = ready_session(&mut sessions, &mut agent, "alice").await;

    let call = ask(sessions.clone(), vec![item(&id)]);
    let (instruction_id, _) = agent.next_screenshot().await;
    let long = "x".repeat(5000);
    let why = format!("dcv: \x1b[31mno display\x1b[0m\n{long}");
    agent
        .report_screenshot(&id, &instruction_id, Err(&why))
        .await
        .unwrap();
    let reply = call.await.unwrap().unwrap();
    assert!(reply.successful_list.is_empty());
    let failed = &reply.unsuccessful_list[0];
    assert_eq!(code(failed.failure_code), FailureCode::AgentFailed);
    assert!(
        failed.failure_reason.contains("dcv: [31mno display[0m"),
        "{}",
        failed.failure_reason
    );
    assert!(!failed.failure_reason.chars().any(char::is_control));
    assert!(failed.failure_reason.len() < 1200, "bounded");
    assert_eq!(
        failed
            .get_session_screenshot_request_data
            .as_ref()
            .unwrap()
            .session_id,
        id,
        "the request item, as sent"
    );
}

#[tokio::test]
async fn a_session_whose_agent_has_no_stream_is_agent_unavailable_at_once() {
    // A timeout the test would notice: the failure must not wait for it.
    let broker = broker_waiting(Duration::from_secs(3600)).await;
    let mut agent = broker.agent().await;
    register(&mut agent, "lin", "linux", 4).await;
    // An adopted READY session: its agent never opened a stream.
    agent
        .heartbeat(beat(
            "lin",
            vec![session("adopted", Ty::Virtual, St::Ready)],
        ))
        .await
        .unwrap();
    let mut sessions = broker.sessions().await;
    let reply = sessions
        .get_session_screenshots(request(vec![item("adopted")]))
        .await
        .unwrap()
        .into_inner();
    let failed = &reply.unsuccessful_list[0];
    assert_eq!(code(failed.failure_code), FailureCode::AgentUnavailable);
    assert!(
        failed.failure_reason.contains("no open instruction stream"),
        "{}",
        failed.failure_reason
    );
    assert_eq!(broker.fleet.pending_screenshots(), 0);
}

#[tokio::test]
async fn an_agent_that_does_not_answer_in_time_is_agent_unavailable() {
    let broker = broker_waiting(Duration::from_millis(300)).await;
    let mut agent = TestAgent::connect(&broker, registration("lin", "linux", 4)).await;
    let mut sessions = broker.sessions().await;
    let id = ready_session(&mut sessions, &mut agent, "alice").await;

    let started = std::time::Instant::now();
    let call = ask(sessions.clone(), vec![item(&id)]);
    let (instruction_id, _) = agent.next_screenshot().await;
    let reply = call.await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the short timeout"
    );
    let failed = &reply.unsuccessful_list[0];
    assert_eq!(code(failed.failure_code), FailureCode::AgentUnavailable);
    assert!(
        failed
            .failure_reason
            .contains("did not answer within 300ms"),
        "{}",
        failed.failure_reason
    );
    assert_eq!(broker.fleet.pending_screenshots(), 0, "nothing left behind");
    // The late answer is accepted and ignored.
    agent
        .report_screenshot(&id, &instruction_id, Ok(vec![image(png(1, 1, 0))]))
        .await
        .unwrap();
}

#[tokio::test]
async fn unknown_not_ready_duplicate_and_malformed_items_fail_on_their_own() {
    let broker = Broker::quiet().await;
    let mut agent = TestAgent::connect(&broker, registration("lin", "linux", 4)).await;
    let mut sessions = broker.sessions().await;
    let ready = ready_session(&mut sessions, &mut agent, "alice").await;
    // A session still being created.
    let creating = sessions
        .create_sessions(create_req(vec![create_item("two", "bob", Ty::Virtual)]))
        .await
        .unwrap()
        .into_inner()
        .successful_list[0]
        .id
        .clone();
    agent.next_create().await;

    let call = ask(
        sessions.clone(),
        vec![
            item("nobody"),
            item(&creating),
            item(&ready),
            item(&ready),
            item(""),
        ],
    );
    let (instruction_id, _) = agent.next_screenshot().await;
    agent
        .report_screenshot(&ready, &instruction_id, Ok(vec![image(png(2, 2, 9))]))
        .await
        .unwrap();
    let reply = call.await.unwrap().unwrap();
    assert_eq!(reply.successful_list.len(), 1);
    let failures: Vec<(String, FailureCode, String)> = reply
        .unsuccessful_list
        .iter()
        .map(|f| {
            (
                f.get_session_screenshot_request_data
                    .as_ref()
                    .unwrap()
                    .session_id
                    .clone(),
                code(f.failure_code),
                f.failure_reason.clone(),
            )
        })
        .collect();
    assert_eq!(failures[0].0, "nobody");
    assert_eq!(failures[0].1, FailureCode::SessionNotFound);
    assert_eq!(failures[0].2, "Dcv session not found.");
    assert_eq!(
        (failures[1].0.as_str(), failures[1].1),
        (creating.as_str(), FailureCode::SessionNotReady)
    );
    assert_eq!(
        (failures[2].0.as_str(), failures[2].1),
        (ready.as_str(), FailureCode::DuplicateSessionId)
    );
    assert_eq!(failures[3].1, FailureCode::InvalidSessionParameter);
    assert_eq!(failures.len(), 4);
}

#[tokio::test]
async fn sizes_out_of_range_and_batches_out_of_bounds_are_bad_requests() {
    let broker = Broker::quiet().await;
    let mut sessions = broker.sessions().await;
    let mut wide = item("a");
    wide.max_width = Some(4097);
    let mut flat = item("b");
    flat.max_height = Some(0);
    let mut negative = item("c");
    negative.max_width = Some(-1);
    let err = sessions
        .get_session_screenshots(request(vec![item("ok"), wide, flat, negative]))
        .await
        .unwrap_err();
    let fields: Vec<String> = violations(&err).into_iter().map(|(f, _)| f).collect();
    assert_eq!(
        fields,
        [
            "Sessions[1].MaxWidth",
            "Sessions[2].MaxHeight",
            "Sessions[3].MaxWidth"
        ]
    );

    for n in [0, 101] {
        let err = sessions
            .get_session_screenshots(request((0..n).map(|i| item(&format!("s{i}"))).collect()))
            .await
            .unwrap_err();
        let v = violations(&err);
        assert_eq!(v[0].0, "Sessions");
        assert!(v[0].1.contains("1 to 100"), "{}", v[0].1);
    }
}

#[tokio::test]
async fn an_answer_from_another_server_is_ignored() {
    let broker = Broker::quiet().await;
    let mut a = TestAgent::connect(&broker, registration("a", "linux", 4)).await;
    let mut b = TestAgent::connect(&broker, registration("b", "linux", 4)).await;
    let mut sessions = broker.sessions().await;
    // Spread placement: the first session on a, the second on b.
    let on_a = ready_session(&mut sessions, &mut a, "alice").await;
    let _on_b = ready_session(&mut sessions, &mut b, "bob").await;

    let call = ask(sessions.clone(), vec![item(&on_a)]);
    let (instruction_id, _) = a.next_screenshot().await;
    // b answers a's instruction: accepted, ignored.
    b.report_screenshot(&on_a, &instruction_id, Ok(vec![image(png(1, 1, 200))]))
        .await
        .unwrap();
    assert_eq!(broker.fleet.pending_screenshots(), 1, "still a's to answer");
    a.report_screenshot(&on_a, &instruction_id, Ok(vec![image(png(1, 1, 100))]))
        .await
        .unwrap();
    let reply = call.await.unwrap().unwrap();
    let data = &reply.successful_list[0]
        .session_screenshot
        .as_ref()
        .unwrap()
        .images[0]
        .data;
    assert_eq!(decode(data).2, 100, "a's image, not b's");
    // An id nobody asked for is accepted and ignored too.
    a.report_screenshot(&on_a, "not-an-instruction", Ok(vec![image(png(1, 1, 0))]))
        .await
        .unwrap();
}

#[tokio::test]
async fn reports_past_their_bounds_are_refused() {
    let broker = Broker::quiet().await;
    let mut agent = TestAgent::connect(&broker, registration("lin", "linux", 4)).await;
    let mut sessions = broker.sessions().await;
    let id = ready_session(&mut sessions, &mut agent, "alice").await;
    let call = ask(sessions.clone(), vec![item(&id)]);
    let (instruction_id, _) = agent.next_screenshot().await;

    let many = vec![image(png(1, 1, 0)); MAX_SCREENSHOT_IMAGES + 1];
    let err = agent
        .report_screenshot(&id, &instruction_id, Ok(many))
        .await
        .unwrap_err();
    assert_eq!(violations(&err)[0].0, "Images");
    let big = image(vec![0; MAX_SCREENSHOT_REPORT_BYTES + 1]);
    let err = agent
        .report_screenshot(&id, &instruction_id, Ok(vec![big]))
        .await
        .unwrap_err();
    assert_eq!(violations(&err)[0].0, "Images");
    let mut gif = image(png(1, 1, 0));
    gif.format = "gif".into();
    let err = agent
        .report_screenshot(&id, &instruction_id, Ok(vec![gif]))
        .await
        .unwrap_err();
    assert_eq!(violations(&err)[0].0, "Images[0].Format");
    let err = agent
        .report_screenshot(&id, &instruction_id, Ok(vec![]))
        .await
        .unwrap_err();
    assert_eq!(violations(&err)[0].0, "Images");
    let err = agent
        .report_screenshot(&id, "", Ok(vec![image(png(1, 1, 0))]))
        .await
        .unwrap_err();
    assert_eq!(violations(&err)[0].0, "InstructionId");

    // None of them answered the instruction; a good report still can.
    assert_eq!(broker.fleet.pending_screenshots(), 1);
    agent
        .report_screenshot(&id, &instruction_id, Ok(vec![image(png(3, 3, 1))]))
        .await
        .unwrap();
    assert_eq!(call.await.unwrap().unwrap().successful_list.len(), 1);
}

#[tokio::test]
async fn screenshots_past_the_reply_budget_fail_with_reply_size_limit() {
    let broker = Broker::quiet().await;
    let mut agent = TestAgent::connect(&broker, registration("lin", "linux", 4)).await;
    let mut sessions = broker.sessions().await;
    let ids = [
        ready_session(&mut sessions, &mut agent, "alice").await,
        ready_session(&mut sessions, &mut agent, "bob").await,
        ready_session(&mut sessions, &mut agent, "carol").await,
    ];
    // The caller's client keeps tonic's default 4 MiB receive limit: the
    // reply must fit under it.
    let call = ask(sessions.clone(), ids.iter().map(|id| item(id)).collect());
    let half = MAX_SCREENSHOT_REPLY_BYTES / 2 + 1;
    let sizes = [half, half, 1000];
    for _ in 0..3 {
        let (instruction_id, shot) = agent.next_screenshot().await;
        let n = ids.iter().position(|i| *i == shot.session_id).unwrap();
        agent
            .report_screenshot(
                &shot.session_id,
                &instruction_id,
                Ok(vec![image(vec![n as u8; sizes[n]])]),
            )
            .await
            .unwrap();
    }
    let reply = call.await.unwrap().unwrap();
    let got: Vec<&str> = reply
        .successful_list
        .iter()
        .map(|s| s.session_screenshot.as_ref().unwrap().session_id.as_str())
        .collect();
    assert_eq!(got, [ids[0].as_str(), ids[2].as_str()]);
    let failed = &reply.unsuccessful_list[0];
    assert_eq!(code(failed.failure_code), FailureCode::ReplySizeLimit);
    assert_eq!(
        failed
            .get_session_screenshot_request_data
            .as_ref()
            .unwrap()
            .session_id,
        ids[1]
    );
}

#[tokio::test]
async fn a_caller_that_goes_away_leaves_nothing_behind() {
    let broker = broker_waiting(Duration::from_secs(3600)).await;
    let mut agent = TestAgent::connect(&broker, registration("lin", "linux", 4)).await;
    let mut sessions = broker.sessions().await;
    let id = ready_session(&mut sessions, &mut agent, "alice").await;

    let call = ask(broker.sessions().await, vec![item(&id)]);
    let (instruction_id, _) = agent.next_screenshot().await;
    assert_eq!(broker.fleet.pending_screenshots(), 1);
    call.abort();
    // The client resets its stream; the broker drops the request and its
    // wait. Polled, bounded: the reset crosses the network.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while broker.fleet.pending_screenshots() != 0 {
        assert!(std::time::Instant::now() < deadline, "still pending");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The answer that comes after is accepted and ignored.
    agent
        .report_screenshot(&id, &instruction_id, Ok(vec![image(png(1, 1, 0))]))
        .await
        .unwrap();
}
