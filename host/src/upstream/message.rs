//! The upstream's messages as they are read off a response: one JSON-RPC message, a batch,
//! newline-delimited JSON, or SSE events. A response keeps its `result` as the upstream's text
//! ([`Reply::Result`]), so a tool's answer is never parsed into a tree on its way back; the
//! gateway reads only the envelope (`id`, `method`, `error`). Notifications and requests, small
//! and inspected, are trees. This module must never take another request's response for ours.

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::UpstreamError;

/// The upstream's answer to one JSON-RPC request: either `result` (its text, as sent) or
/// `error`.
#[derive(Debug, Clone)]
pub enum Reply {
    Result(Box<RawValue>),
    Error(Value),
}

impl Reply {
    /// The result read as a tree, for the methods whose result the gateway reads (`None` for an
    /// error).
    pub fn result_tree(&self) -> Option<Value> {
        match self {
            Self::Result(raw) => serde_json::from_str(raw.get()).ok(),
            Self::Error(_) => None,
        }
    }

    /// A result the gateway built (a test's, or a stream's end read as a tree).
    pub fn result(v: &Value) -> Self {
        match serde_json::value::to_raw_value(v) {
            Ok(raw) => Self::Result(raw),
            Err(e) => Self::Error(Value::from(e.to_string())), // a `Value` always serialises
        }
    }
}

/// Most notifications kept from one upstream answer (the answer is bounded in bytes too).
pub const MAX_NOTIFICATIONS: usize = 64;

/// One message of the upstream.
pub(super) enum Message {
    /// A response: its `id` (`Some(Null)` when `null`) and its reply.
    Response { id: Option<Value>, reply: Reply },
    /// A notification or a request.
    Other(Value),
}

/// A member that is present, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// The envelope of a message; `result` stays text.
#[derive(Deserialize)]
struct Head {
    #[serde(default, deserialize_with = "present")]
    id: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    method: Option<serde::de::IgnoredAny>,
    #[serde(default, deserialize_with = "present")]
    result: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    error: Option<Value>,
}

/// Reads one message: a response's result is kept as text; anything else is read whole.
pub(super) fn message(text: &[u8]) -> Result<Message, serde_json::Error> {
    let head: Head = serde_json::from_slice(text)?;
    if head.method.is_none() {
        if let Some(r) = head.result {
            let reply = Reply::Result(r);
            return Ok(Message::Response { id: head.id, reply });
        }
        if let Some(e) = head.error {
            let reply = Reply::Error(e);
            return Ok(Message::Response { id: head.id, reply });
        }
    }
    serde_json::from_slice(text).map(Message::Other)
}

/// The reply of a response already read as a tree (a listen stream's end).
pub(super) fn to_reply(mut message: Value) -> Result<Reply, UpstreamError> {
    let Some(obj) = message.as_object_mut() else {
        return Err(UpstreamError::Malformed("not a JSON object".into()));
    };
    if let Some(r) = obj.remove("result") {
        Ok(Reply::result(&r))
    } else if let Some(e) = obj.remove("error") {
        Ok(Reply::Error(e))
    } else {
        Err(UpstreamError::Malformed("neither result nor error".into()))
    }
}

/// Whether `v` is a notification (a method and no id).
pub(super) fn is_notification(v: &Value) -> bool {
    v.get("method").is_some() && v.get("id").is_none()
}

/// Keeps a notification that came before the answer, up to [`MAX_NOTIFICATIONS`].
pub(super) fn keep(notifications: &mut Vec<Value>, v: Value) {
    if is_notification(&v) && notifications.len() < MAX_NOTIFICATIONS {
        notifications.push(v);
    }
}

/// Of several messages, the response with our id; failing that, an error response without an
/// id (a server that could not read the request answers so). The notifications before the
/// response are kept in `notifications`.
fn pick_response(
    messages: impl Iterator<Item = Message>,
    id: u64,
    notifications: &mut Vec<Value>,
) -> Option<Reply> {
    let mut anonymous_error = None;
    for m in messages {
        match m {
            Message::Other(v) => keep(notifications, v),
            Message::Response { id: Some(x), reply } if x.as_u64() == Some(id) => {
                return Some(reply);
            }
            Message::Response {
                id: None | Some(Value::Null),
                reply: e @ Reply::Error(_),
            } if anonymous_error.is_none() => anonymous_error = Some(e),
            Message::Response { .. } => {}
        }
    }
    anonymous_error
}

/// A JSON body: one JSON-RPC message as usual (the answer, whatever its id: a refusal may carry
/// none), a batch, or newline-delimited JSON (several messages, one per line: notifications the
/// upstream sent before its answer), of which the response with our id is taken.
pub(super) fn find_json_response(
    body: &[u8],
    id: u64,
    notifications: &mut Vec<Value>,
) -> Result<Reply, UpstreamError> {
    let multiline = body.contains(&b'\n');
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        match serde_json::from_slice::<Vec<Box<RawValue>>>(body) {
            Ok(batch) => {
                let messages = batch
                    .iter()
                    .filter_map(|m| message(m.get().as_bytes()).ok());
                return pick_response(messages, id, notifications)
                    .ok_or_else(|| UpstreamError::Malformed("no response in the batch".into()));
            }
            Err(e) if !multiline => return Err(UpstreamError::Malformed(e.to_string())),
            Err(_) => {}
        }
    } else {
        match message(body) {
            Ok(Message::Response { reply, .. }) => return Ok(reply),
            Ok(Message::Other(_)) => {
                return Err(UpstreamError::Malformed("neither result nor error".into()));
            }
            Err(e) if !multiline => return Err(UpstreamError::Malformed(e.to_string())),
            Err(_) => {}
        }
    }
    let mut lines = Vec::new();
    for line in body.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let m = message(line).map_err(|e| UpstreamError::Malformed(format!("NDJSON line: {e}")))?;
        lines.push(m);
    }
    pick_response(lines.into_iter(), id, notifications)
        .ok_or_else(|| UpstreamError::Malformed("no response among the JSON lines".into()))
}

/// An SSE body as it arrives: its frames pushed in, its complete events taken out in order.
/// Each byte is looked at once, however many frames an event spans (a large event comes in
/// many) and however many events a frame holds (an upstream's frame of 400 KiB of empty
/// events must not cost a scan of the rest of the frame per event, on a runtime thread).
#[derive(Debug, Default)]
pub(super) struct Events {
    buf: Vec<u8>,
    /// Where the bytes not yet taken as events begin.
    start: usize,
    /// How far `buf` was searched for an event's end (never before `start`).
    searched: usize,
    /// Bytes looked at by the search, for the tests' bound.
    #[cfg(test)]
    looked_at: usize,
}

impl Events {
    pub(super) fn push(&mut self, data: &[u8]) {
        // What was taken goes once a frame, not once an event.
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.searched -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes held (a partial event, or a body that is not a stream).
    pub(super) fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    pub(super) fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
        self.searched = 0;
    }

    pub(super) fn take(&mut self) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.drain(..self.start);
        self.start = 0;
        self.searched = 0;
        buf
    }

    /// The next complete event (up to and including its blank line): it ends at the first
    /// `\n` that closes a `\n\n` or a `\r\n\r\n` within the event.
    pub(super) fn next_event(&mut self) -> Option<Vec<u8>> {
        let mut at = self.searched.max(self.start);
        while let Some(i) = self.buf[at..].iter().position(|b| *b == b'\n') {
            let lf = at + i;
            #[cfg(test)]
            {
                self.looked_at += i + 1;
            }
            let event = &self.buf[self.start..=lf];
            if event.ends_with(b"\n\n") || event.ends_with(b"\r\n\r\n") {
                let event = event.to_vec();
                self.start = lf + 1;
                self.searched = self.start;
                return Some(event);
            }
            at = lf + 1;
        }
        #[cfg(test)]
        {
            self.looked_at += self.buf.len() - at;
        }
        self.searched = self.buf.len();
        None
    }
}

/// The data of one SSE event (its `data:` lines joined).
fn event_data(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let mut data = String::new();
    for line in text.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(rest) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
        }
    }
    Some(data)
}

/// The JSON message of one SSE event, as a tree, if it holds one.
pub(super) fn sse_event_json(event: &[u8]) -> Option<Value> {
    serde_json::from_str(&event_data(event)?).ok()
}

/// The JSON-RPC message of one SSE event, a response's result kept as text.
pub(super) fn sse_event_message(event: &[u8]) -> Option<Message> {
    message(event_data(event)?.as_bytes()).ok()
}

/// Picks the JSON-RPC response with our id out of an SSE stream (skipping notifications and
/// server requests the upstream interleaves).
pub(super) fn find_sse_response(
    body: &[u8],
    id: u64,
    notifications: &mut Vec<Value>,
) -> Result<Reply, UpstreamError> {
    let text = std::str::from_utf8(body).map_err(|e| UpstreamError::Malformed(e.to_string()))?;
    let mut data = String::new();
    let mut check = |data: &mut String| -> Option<Reply> {
        if data.is_empty() {
            return None;
        }
        let parsed = message(data.as_bytes()).ok();
        data.clear();
        match parsed? {
            Message::Response { id: Some(x), reply } if x.as_u64() == Some(id) => Some(reply),
            Message::Other(v) => {
                keep(notifications, v);
                None
            }
            Message::Response { .. } => None,
        }
    };
    for line in text.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            if let Some(r) = check(&mut data) {
                return Ok(r);
            }
        } else if let Some(rest) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
        }
    }
    check(&mut data).ok_or_else(|| UpstreamError::Malformed("no response in event stream".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn result(r: Result<Reply, UpstreamError>) -> Value {
        match r {
            Ok(Reply::Result(raw)) => serde_json::from_str(raw.get()).expect("json"),
            other => panic!("not a result: {other:?}"),
        }
    }

    fn error(r: Result<Reply, UpstreamError>) -> Value {
        match r {
            Ok(Reply::Error(e)) => e,
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn ndjson_and_batches_pick_our_response() {
        let mut notes = Vec::new();
        let ndjson = b"{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{}}\n\
{\"jsonrpc\":\"2.0\",\"id\":6,\"result\":{\"other\":true}}\r\n\
{\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"ok\":true}}\n\n";
        assert_eq!(
            result(find_json_response(ndjson, 7, &mut notes)),
            json!({"ok": true})
        );
        assert_eq!(notes.len(), 1, "the notification before the answer is kept");
        assert_eq!(notes[0]["method"], "notifications/message");
        assert!(find_json_response(ndjson, 8, &mut Vec::new()).is_err());
        assert!(find_json_response(b"{\"a\":1}\n{bad", 1, &mut Vec::new()).is_err());
        // One object is the answer whatever its id (a refusal may carry none).
        let one = find_json_response(
            b"{\"jsonrpc\":\"2.0\",\"id\":\"x\",\"error\":{}}",
            3,
            &mut Vec::new(),
        );
        assert!(error(one).is_object());
        let batch =
            br#"[{"jsonrpc":"2.0","id":1,"result":{}},{"jsonrpc":"2.0","id":2,"result":{"n":2}}]"#;
        assert_eq!(
            result(find_json_response(batch, 2, &mut Vec::new()))["n"],
            2
        );
        let anon = b"{\"jsonrpc\":\"2.0\",\"method\":\"x\"}\n{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{\"code\":-32700}}\n";
        assert_eq!(
            error(find_json_response(anon, 9, &mut Vec::new()))["code"],
            -32700
        );
        assert!(super::super::needs_permit("prompts/get"));
        // A notification alone is no answer; a null result is one.
        assert!(find_json_response(br#"{"method":"x"}"#, 1, &mut Vec::new()).is_err());
        assert_eq!(
            result(find_json_response(
                br#"{"id":1,"result":null}"#,
                1,
                &mut Vec::new()
            )),
            Value::Null
        );
    }

    #[test]
    fn a_result_is_kept_as_the_upstream_wrote_it() {
        let text = br#"{"jsonrpc":"2.0","id":4,"result":{"z":1.50,"a":[1e3, "\u00e9"]}}"#;
        match find_json_response(text, 4, &mut Vec::new()) {
            Ok(Reply::Result(raw)) => assert_eq!(raw.get(), r#"{"z":1.50,"a":[1e3, "\u00e9"]}"#),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn events_split_wherever_the_frames_cut() {
        let stream = b"data: 1\n\ndata: 2\r\n\r\n: comment\n\ndata: 3\n\n";
        for cut in 1..stream.len() {
            let mut events = Events::default();
            let mut seen = Vec::new();
            for frame in stream.chunks(cut) {
                events.push(frame);
                while let Some(e) = events.next_event() {
                    seen.push(String::from_utf8(e).expect("utf-8"));
                }
            }
            assert_eq!(
                seen,
                [
                    "data: 1\n\n",
                    "data: 2\r\n\r\n",
                    ": comment\n\n",
                    "data: 3\n\n"
                ],
                "frames of {cut}"
            );
            assert_eq!(events.len(), 0);
        }
    }

    #[test]
    fn a_frame_of_many_events_is_looked_at_once() {
        // 100,000 empty events and one with data, in one frame and then split in two.
        let mut stream = b"\n\n".repeat(100_000);
        stream.extend_from_slice(b"data: 1\r\n\r\n");
        for frames in [vec![&stream[..]], vec![&stream[..1001], &stream[1001..]]] {
            let mut events = Events::default();
            let mut seen = 0;
            for frame in frames {
                events.push(frame);
                while events.next_event().is_some() {
                    seen += 1;
                }
            }
            assert_eq!(seen, 100_001);
            assert_eq!(events.len(), 0);
            assert!(
                events.looked_at <= stream.len(),
                "{} bytes looked at for a stream of {}",
                events.looked_at,
                stream.len()
            );
        }
    }

    #[test]
    fn sse_picks_our_response() {
        let body = b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\n\
event: message\r\ndata: {\"jsonrpc\":\"2.0\",\"id\":6,\"result\":{\"other\":true}}\r\n\r\n\
event: message\r\ndata: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"ok\":true}}\r\n\r\n";
        let mut notes = Vec::new();
        assert_eq!(
            result(find_sse_response(body, 7, &mut notes)),
            json!({"ok": true})
        );
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0]["method"], "notifications/progress");
        assert!(find_sse_response(body, 8, &mut Vec::new()).is_err());
        assert!(find_sse_response(b"data: {bad", 1, &mut Vec::new()).is_err());
        // The last event may lack its blank line.
        let cut = b"data: {\"id\":3,\"result\":{}}";
        assert_eq!(
            result(find_sse_response(cut, 3, &mut Vec::new())),
            json!({})
        );
    }
}
