//! The mock's Runway task records: how a status change rewrites a record, the
//! price table, and the JSON shapes the upstream answers with.

use serde::Serialize;

use super::RefundStyle;

/// One Runway task as the mock upstream holds it.
///
/// `status`, `point` and `refund` are strings, exactly as the upstream sends them
/// (`""` while unknown), so tests can set odd values (`"7"`, `"abc"`) and see how
/// gatehouse copes.
#[derive(Debug, Clone, PartialEq)]
pub struct MockTask {
    pub task_id: String,
    /// The `callback_url` of the submit body; the mock POSTs status changes there.
    pub callback_url: String,
    pub model: String,
    /// `options.seconds` of the submit body (10 when absent).
    pub seconds: u32,
    pub ratio: String,
    pub prompt: String,
    pub prompt_en: Option<String>,
    /// `"0"` queued, `"1"` generating, `"2"` failed, `"3"` succeeded (or whatever a test set).
    pub status: String,
    /// Informative only: `""`, `"running"`, `"failed"`, `"succeeded"`.
    pub state: String,
    /// Points the upstream deducted: `""` while queued, then the price.
    pub point: String,
    /// `""` until terminal; `"0"` on success; on failure the amount or the flag `"1"` (see `RefundStyle`).
    pub refund: String,
    pub video_url: Option<String>,
    pub poster: Option<String>,
    pub last_frame: Option<String>,
    pub msg: Option<String>,
    /// Unix seconds.
    pub create_time: u64,
    pub update_time: u64,
    /// `/runway/feed` calls for this task so far, including those answered `task_not_exist`.
    pub feeds: u32,
    /// The submit body as the mock received it.
    pub request: serde_json::Value,
    /// Creation order, so `tasks()` lists tasks as they were submitted.
    pub(super) seq: u64,
}

/// What the upstream charges for a Runway task: gen3 costs 32 points a second,
/// gen2 20 (gen3 10 s → 320, gen3 5 s → 160, gen2 10 s → 200, gen2 5 s → 100).
/// Unknown models are priced like gen3: the mock is lenient so that a test can
/// show it was gatehouse, not the upstream, that refused a bad model.
pub fn mock_price(model: &str, seconds: u32) -> u32 {
    let per_second = match model {
        "gen2" => 20,
        _ => 32,
    };
    per_second * seconds
}

/// The submit shape: everything but the id is empty, as the real upstream answers.
pub(super) fn submit_record(task_id: &str) -> Record<'_> {
    Record {
        task_id,
        state: "",
        status: "",
        prompt: "",
        prompt_en: None,
        video_url: None,
        poster: None,
        last_frame: None,
        msg: None,
        point: "",
        refund: "",
        create_time: String::new(),
        update_time: String::new(),
    }
}

impl MockTask {
    /// The flat record (the envelope's `data`, and a callback's whole body).
    pub fn record(&self) -> Record<'_> {
        Record {
            task_id: &self.task_id,
            state: &self.state,
            status: &self.status,
            prompt: &self.prompt,
            prompt_en: self.prompt_en.as_deref(),
            video_url: self.video_url.as_deref(),
            poster: self.poster.as_deref(),
            last_frame: self.last_frame.as_deref(),
            msg: self.msg.as_deref(),
            point: &self.point,
            refund: &self.refund,
            create_time: self.create_time.to_string(),
            update_time: self.update_time.to_string(),
        }
    }

    /// The flat record as JSON.
    pub fn record_json(&self) -> serde_json::Value {
        serde_json::to_value(self.record()).expect("a task record always serializes")
    }

    /// Moves the task to `status` the way the upstream would. `point` / `refund`
    /// override what the upstream would set (`Some("")` empties the field).
    pub(super) fn apply_status(
        &mut self,
        status: &str,
        point: Option<&str>,
        refund: Option<&str>,
        style: RefundStyle,
        now: u64,
    ) {
        let price = mock_price(&self.model, self.seconds).to_string();
        self.status = status.to_string();
        self.state = match status {
            "1" => "running",
            "2" => "failed",
            "3" => "succeeded",
            _ => "",
        }
        .to_string();
        let started = !matches!(status, "" | "0");
        self.point = match point {
            Some(point) => point.to_string(),
            None if started => price,
            None => String::new(),
        };
        self.refund = match (refund, status) {
            (Some(refund), _) => refund.to_string(),
            (None, "2") => match style {
                RefundStyle::Amount => self.point.clone(),
                RefundStyle::Flag => "1".to_string(),
            },
            (None, "3") => "0".to_string(),
            (None, _) => String::new(),
        };
        self.prompt_en = started.then(|| format!("{} (en)", self.prompt));
        let (video_url, poster, last_frame) = if status == "3" {
            let base = format!("https://cdn.example/runway/{}", self.task_id);
            (
                Some(format!("{base}/video.mp4")),
                Some(format!("{base}/poster.png")),
                Some(format!("{base}/last.png")),
            )
        } else {
            (None, None, None)
        };
        self.video_url = video_url;
        self.poster = poster;
        self.last_frame = last_frame;
        self.msg = (status == "2").then(|| "generation failed".to_string());
        self.update_time = now;
    }

    pub(super) fn is_terminal(&self) -> bool {
        matches!(self.status.as_str(), "2" | "3")
    }
}

/// A borrowed view of a task in the upstream's field order and types.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    pub task_id: &'a str,
    pub state: &'a str,
    pub status: &'a str,
    pub prompt: &'a str,
    pub prompt_en: Option<&'a str>,
    pub video_url: Option<&'a str>,
    pub poster: Option<&'a str>,
    pub last_frame: Option<&'a str>,
    pub msg: Option<&'a str>,
    pub point: &'a str,
    pub refund: &'a str,
    pub create_time: String,
    pub update_time: String,
}

/// The envelope every upstream route answers with.
#[derive(Serialize)]
pub(super) struct Envelope<'a, T: Serialize> {
    pub code: i64,
    pub msg: &'a str,
    pub data: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exec_time: Option<serde_json::Number>,
}

/// `{"code":200,"msg":"成功","data":…,"exec_time":…}` as bytes.
pub(super) fn ok_envelope<T: Serialize>(data: T, exec_time: serde_json::Number) -> Vec<u8> {
    serde_json::to_vec(&Envelope {
        code: 200,
        msg: "成功",
        data: Some(data),
        exec_time: Some(exec_time),
    })
    .expect("an envelope always serializes")
}

/// `{"code":…,"msg":…,"data":null}` as bytes.
pub(super) fn error_envelope(code: i64, msg: &str) -> Vec<u8> {
    serde_json::to_vec(&Envelope::<()> {
        code,
        msg,
        data: None,
        exec_time: None,
    })
    .expect("an envelope always serializes")
}
