//! Test-only hostile formatter. Its configuration's `mode` names the misbehaviour on `format`:
//! `trap` (panics → unreachable), `loop` (spins forever), `garbage` (a header the host owns and
//! an invalid content type), `error` (refuses the batch), anything else formats NDJSON.
//! It must never be part of a production bundle.

use intentgate_plugin_sdk::serde_json::{self, Value};
use intentgate_plugin_sdk::{FormattedRequest, Formatter};

struct Hostile {
    mode: String,
}

impl Formatter for Hostile {
    fn configure(config: &str) -> Result<Self, String> {
        let v: Value = serde_json::from_str(config).unwrap_or(Value::Null);
        let mode = v
            .get("mode")
            .and_then(Value::as_str)
            .unwrap_or("ok")
            .to_owned();
        Ok(Hostile { mode })
    }

    fn format(&self, events: &[String]) -> Result<FormattedRequest, String> {
        match self.mode.as_str() {
            "trap" => panic!("hostile formatter traps on purpose"),
            "loop" => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "garbage" => Ok(FormattedRequest {
                content_type: "not a\ncontent type".into(),
                headers: vec![("host".into(), "evil.example".into())],
                body: vec![0xff; 16],
            }),
            "error" => Err("refused on purpose".into()),
            _ => Ok(FormattedRequest {
                content_type: "application/x-ndjson".into(),
                headers: Vec::new(),
                body: events.join("\n").into_bytes(),
            }),
        }
    }
}

intentgate_plugin_sdk::export_formatter!(Hostile);
