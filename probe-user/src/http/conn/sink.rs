//! How a request's events and end reach the `Observer`: the body fields filled in when it starts,
//! each classified response event applied to it (`ReqSink`), and its record when it finishes.

use super::{Ingress, Req};
use crate::http::{
    classify::{Classified, EventSink},
    sniff, ConnId, Gap, Moment, Observer, Outcome, ParseErrorKind, RequestRecord, MAX_GAPS_KEPT,
};

/// Fills in a request's body fields if that has not happened yet (its response began, or it ended,
/// before its body was read), and reports it started.
pub(super) fn ensure_started(
    id: ConnId,
    req: &mut Req,
    ingress: &Ingress,
    obs: &mut impl Observer,
) {
    if req.started {
        return;
    }
    req.started = true;
    let sniff = match ingress {
        Ingress::Body(body) if body.seq == Some(req.seq) => body.sniff.as_slice(),
        _ => &[],
    };
    sniff::apply_body(&mut req.meta, sniff, false);
    if req.timed() {
        obs.request_started(id, &req.meta, req.arrival_ns);
    }
}

pub(super) fn finish(
    id: ConnId,
    mut req: Req,
    ingress: &Ingress,
    outcome: Outcome,
    end_ns: u64,
    obs: &mut impl Observer,
) {
    if !req.timed() {
        return;
    }
    ensure_started(id, &mut req, ingress, obs);
    obs.request_finished(RequestRecord {
        conn: id,
        meta: req.meta,
        status: req.status,
        outcome,
        arrival_ns: req.arrival_ns,
        first_token_ns: req.first_token_ns,
        read: req.read,
        first_token_at: req.first_token_at,
        end_ns,
        content_events: req.content_events,
        token_events: req.token_events,
        gaps_ns: req.gaps_ns,
        prompt_tokens: req.prompt_tokens,
        completion_tokens: req.completion_tokens,
        response_id: req.response_id,
    });
}

/// Applies a response's events to the request it answers.
pub(super) struct ReqSink<'a, O: Observer> {
    pub id: ConnId,
    pub req: &'a mut Req,
    pub obs: &'a mut O,
    /// The write being parsed (`None` when the response ends without one: close, give-up).
    pub io: Option<Moment>,
}

impl<O: Observer> EventSink for ReqSink<'_, O> {
    fn event(&mut self, ev: Classified, ts: u64) {
        let r = &mut *self.req;
        r.stream_error |= ev.error;
        r.prompt_tokens = ev.prompt_tokens.or(r.prompt_tokens);
        r.completion_tokens = ev.completion_tokens.or(r.completion_tokens);
        r.response_id = r.response_id.or(ev.id);
        if ev.token || ev.content {
            r.token_events += 1;
        }
        if !ev.content {
            return;
        }
        r.content_events += 1;
        // The write as a moment; without one (the response ended by a close), time only.
        let at = Moment {
            ts_ns: ts,
            ..self.io.unwrap_or_default()
        };
        if r.first_token_ns.is_none() {
            r.first_token_ns = Some(ts);
            r.first_token_at = self.io.is_some().then_some(at);
            if r.timed() {
                self.obs
                    .first_token(self.id, &r.meta, ts.saturating_sub(r.arrival_ns));
            }
        } else {
            let gap = Gap {
                from: r.last_content,
                to: at,
                id: r.response_id,
            };
            if !r.gaps_dropped && r.gaps_ns.len() < MAX_GAPS_KEPT {
                r.gaps_ns.push(gap.ns());
            }
            if r.timed() {
                self.obs.token_gap(self.id, &r.meta, gap);
            }
        }
        r.last_content = at;
    }

    fn stream_error(&mut self) {
        self.req.stream_error = true;
    }

    fn parse_error(&mut self, kind: ParseErrorKind) {
        if kind == ParseErrorKind::TruncatedCapture {
            if self.req.truncated_reported {
                return;
            }
            self.req.truncated_reported = true;
        }
        self.obs.parse_error(self.id, kind);
    }
}
