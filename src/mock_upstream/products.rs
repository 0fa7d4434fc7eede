//! Async task products beyond Runway, in the shapes compatible aggregators document:
//!
//! - Suno: `POST /suno/submit/music` answers `{"code":"success","msg":"","data":"<task id>"}`;
//!   `GET /suno/fetch/{id}` answers `{"code":"success","msg":"","data":{"task_id",…,"status"}}`
//!   and, for an id it does not know, HTTP 200 `{"code":"error","msg":"task_not_exist","data":null}`
//!   (the same "error as HTTP 200" habit as `/runway/feed`).
//! - Midjourney (midjourney-proxy style): `POST /mj/submit/{action}` answers
//!   `{"code":1,"description":"提交成功","result":"<task id>","properties":{}}`, or code 4 with HTTP
//!   200 when the prompt is missing; `GET /mj/task/{id}/fetch` answers the flat task
//!   (`{"id",…,"status","progress","imageUrl",…}`), or HTTP 404 with code 4 for an unknown id.
//!
//! Statuses go `SUBMITTED` → `IN_PROGRESS` → `SUCCESS` / `FAILURE`: on timers with
//! `auto_progress`, otherwise when a test calls `set_suno_status` / `set_mj_status`.

use serde_json::{json, Value};

/// The product a task belongs to: ids are looked up within one product only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Product {
    Suno,
    Midjourney,
}

/// One Suno or Midjourney task as the mock holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProductTask {
    pub product: Product,
    pub id: String,
    /// `"MUSIC"` for Suno; the upper-cased submit action for Midjourney (`"IMAGINE"`).
    pub action: String,
    /// `"SUBMITTED"`, `"IN_PROGRESS"`, `"SUCCESS"`, `"FAILURE"` (or whatever a test set).
    pub status: String,
    pub prompt: String,
    /// The submit body as the mock received it.
    pub request: Value,
    /// Unix milliseconds.
    pub submit_time: u64,
    pub start_time: Option<u64>,
    pub finish_time: Option<u64>,
    /// Fetches of this task so far.
    pub fetches: u32,
    /// Creation order.
    pub(super) seq: u64,
}

impl ProductTask {
    pub(super) fn new(
        product: Product,
        id: String,
        action: String,
        request: Value,
        now_ms: u64,
        seq: u64,
    ) -> ProductTask {
        let prompt = ["/prompt", "/gpt_description_prompt"]
            .iter()
            .find_map(|pointer| request.pointer(pointer).and_then(Value::as_str))
            .unwrap_or_default()
            .to_string();
        ProductTask {
            product,
            id,
            action,
            status: "SUBMITTED".to_string(),
            prompt,
            request,
            submit_time: now_ms,
            start_time: None,
            finish_time: None,
            fetches: 0,
            seq,
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self.status.as_str(), "SUCCESS" | "FAILURE")
    }

    /// Moves the task to `status`, stamping start and finish times as the product would.
    pub(super) fn apply_status(&mut self, status: &str, now_ms: u64) {
        self.status = status.to_string();
        if status != "SUBMITTED" && status != "NOT_START" {
            self.start_time.get_or_insert(now_ms);
        }
        self.finish_time = self.is_terminal().then_some(now_ms);
    }

    fn progress(&self) -> &'static str {
        match self.status.as_str() {
            "SUCCESS" => "100%",
            "IN_PROGRESS" => "50%",
            _ => "0%",
        }
    }

    fn fail_reason(&self) -> &'static str {
        if self.status == "FAILURE" {
            "generation failed"
        } else {
            ""
        }
    }

    /// The fetch answer in the product's own shape.
    pub fn fetch_json(&self) -> Value {
        match self.product {
            Product::Suno => {
                let clips: Vec<Value> = if self.status == "SUCCESS" {
                    (0..2)
                        .map(|n| {
                            let base = format!("https://cdn.example/suno/{}/{n}", self.id);
                            json!({
                                "id": format!("{}-{n}", self.id),
                                "title": "mock song",
                                "status": "complete",
                                "audio_url": format!("{base}.mp3"),
                                "image_url": format!("{base}.png"),
                                "duration": 120,
                            })
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                // Suno's compatible APIs report seconds.
                let seconds = |ms: Option<u64>| ms.map_or(0, |ms| ms / 1000);
                json!({
                    "code": "success",
                    "msg": "",
                    "data": {
                        "task_id": self.id,
                        "action": self.action,
                        "status": self.status,
                        "fail_reason": self.fail_reason(),
                        "submit_time": self.submit_time / 1000,
                        "start_time": seconds(self.start_time),
                        "finish_time": seconds(self.finish_time),
                        "progress": self.progress(),
                        "data": clips,
                    },
                })
            }
            Product::Midjourney => json!({
                "id": self.id,
                "action": self.action,
                "prompt": self.prompt,
                "promptEn": self.prompt,
                "description": "提交成功",
                "state": "",
                "status": self.status,
                "progress": self.progress(),
                "imageUrl": (self.status == "SUCCESS")
                    .then(|| format!("https://cdn.example/mj/{}.png", self.id)),
                "failReason": self.fail_reason(),
                "submitTime": self.submit_time,
                "startTime": self.start_time,
                "finishTime": self.finish_time,
                "buttons": [],
                "properties": {},
            }),
        }
    }
}

/// Suno's submit answer: the task id is the whole `data`.
pub(super) fn suno_submitted(id: &str) -> Value {
    json!({"code": "success", "msg": "", "data": id})
}

/// Suno's error shape (a string `code`).
pub(super) fn suno_error(msg: &str) -> Value {
    json!({"code": "error", "msg": msg, "data": null})
}

/// Midjourney's submit answer (code 1: submitted).
pub(super) fn mj_submitted(id: &str) -> Value {
    json!({"code": 1, "description": "提交成功", "result": id, "properties": {}})
}

/// Midjourney's refusal shape (code 4: validation error).
pub(super) fn mj_error(description: &str) -> Value {
    json!({"code": 4, "description": description, "result": null, "properties": {}})
}
