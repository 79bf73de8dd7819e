//! This province as a partner's client: a live subscription to every active real-time
//! partner (resumed from the cursor saved with the last record stored, so a cut link
//! catches up without gap or duplicate), and manual pulls on demand.

use crate::records;
use crate::service::{Exchange, item_error};
use crate::store::entities::{follow_lease, partner};
use crate::tls::{Issued, client_tls};
use chrono::Utc;
use futures::FutureExt as _;
use healthcode_db::db_error;
use healthcode_db::replies::{load, store};
use healthcode_errors::ServiceError;
use healthcode_proto::common::v1::{ColorReason, PersonRef, SignedEnvelope};
use healthcode_proto::exchange::v1 as pb;
use healthcode_proto::risk::v1::RecordNationalCheckRequest;
use healthcode_proto::risk::v1::risk_service_client::RiskServiceClient;
use healthcode_proto::time::ts;
use healthcode_server::outbound::with_deadline;
use healthcode_server::outbound::{Outbound, OutboundError, lazy_channel};
use pb::exchange_service_client::ExchangeServiceClient;
use pb::{PartnerState, SyncMode};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// What this province presents to one partner: the partner's CA (for its server
/// certificate) and the client certificate that partner issued to this province.
#[derive(Clone)]
pub struct OutboundTls {
    pub ca_pem: String,
    pub client: Issued,
}

pub type Risk = RiskServiceClient<InterceptedService<Channel, Outbound>>;

/// The risk service's client (national checks are recorded there), with this service's
/// token and a deadline on each call.
pub fn risk_client(url: &str, token: &str, timeout: Duration) -> Result<Risk, OutboundError> {
    Ok(RiskServiceClient::with_interceptor(
        lazy_channel(url, timeout)?,
        Outbound::new(token)?,
    ))
}

/// Partners asked per national check.
pub const MAX_CHECKED_PARTNERS: usize = 16;

pub struct PartnerSync {
    exchange: Arc<Exchange>,
    /// This replica's name in the follow leases (its consumer name, the pod name).
    holder: String,
    /// How long a lease holds without renewal: three heartbeats.
    lease: Duration,
    risk: Option<Risk>,
    tls: BTreeMap<String, OutboundTls>,
    timeout: Duration,
    /// A stream silent for longer than this is taken for dead and reopened.
    idle: Duration,
}

/// One partner's answer to a national check: its checked records and whether it knew
/// nothing of the person, or why it gave no usable answer (code, reason, message).
type Asked = Result<(Vec<pb::SignedRecord>, bool), (tonic::Code, &'static str, String)>;

/// Records a partner may answer a national check with (the national platform relays one
/// per province).
const MAX_ANSWER_RECORDS: usize = 40;

/// Records stored per transaction when the stream holds many.
const FOLLOW_BATCH: usize = 500;

/// Records per page when pulling.
const PULL_PAGE: u32 = 500;

impl PartnerSync {
    pub fn new(
        exchange: Arc<Exchange>,
        holder: &str,
        risk: Option<Risk>,
        tls: BTreeMap<String, OutboundTls>,
        timeout: Duration,
        heartbeat: Duration,
    ) -> Self {
        PartnerSync {
            exchange,
            holder: holder.to_owned(),
            lease: heartbeat * 3,
            idle: (heartbeat * 3).max(Duration::from_secs(30)),
            risk,
            tls,
            timeout,
        }
    }

    async fn partner_row(&self, partner_id: &str) -> Result<partner::Model, ServiceError> {
        partner::Entity::find_by_id(partner_id.to_owned())
            .one(self.exchange.db())
            .await
            .map_err(db_error)?
            .ok_or_else(|| ServiceError::NotFound("no such partner".into()))
    }

    fn client(
        &self,
        partner: &partner::Model,
    ) -> Result<ExchangeServiceClient<Channel>, ServiceError> {
        let tls = self.tls.get(&partner.partner_id).ok_or_else(|| {
            ServiceError::precondition(
                "NO_OUTBOUND_TLS",
                "no client certificate for this partner is configured (OUTBOUND_TLS_DIR)",
            )
        })?;
        if partner.endpoint.is_empty() {
            return Err(ServiceError::precondition(
                "NO_ENDPOINT",
                "this partner has no endpoint",
            ));
        }
        let uri: tonic::codegen::http::Uri = partner
            .endpoint
            .parse()
            .map_err(|_| ServiceError::precondition("BAD_ENDPOINT", "the endpoint is not a URL"))?;
        let domain = uri.host().unwrap_or_default().to_owned();
        let endpoint = Endpoint::from_shared(partner.endpoint.clone())
            .map_err(|_| ServiceError::precondition("BAD_ENDPOINT", "the endpoint is not a URL"))?
            .tls_config(client_tls(&tls.ca_pem, &domain, &tls.client))
            .map_err(|e| ServiceError::precondition("BAD_TLS", e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        Ok(ExchangeServiceClient::new(endpoint.connect_lazy()))
    }

    /// Pulls every change of `partner_id` since the saved cursor, page by page, now.
    pub async fn refresh(
        &self,
        partner_id: &str,
    ) -> Result<pb::RefreshFromPartnerResponse, ServiceError> {
        let partner = self.partner_row(partner_id).await?;
        if partner.state == PartnerState::Suspended as i32 {
            return Err(ServiceError::precondition(
                "PARTNER_SUSPENDED",
                "this partner is suspended",
            ));
        }
        let mut client = self.client(&partner)?;
        let mut out = pb::RefreshFromPartnerResponse::default();
        loop {
            let cursor = self.exchange.inbound_cursor(partner_id).await?;
            let page = client
                .pull_changes(with_deadline(
                    pb::PullChangesRequest {
                        cursor,
                        max_records: PULL_PAGE,
                    },
                    self.timeout,
                ))
                .await
                .map_err(|s| {
                    tracing::warn!(partner = %partner_id, code = ?s.code(), "pull from partner failed");
                    partner_refusal(partner_id, &s)
                })?
                .into_inner();
            let envelopes: Vec<_> = page
                .records
                .iter()
                .filter_map(|r| r.envelope.clone())
                .collect();
            if envelopes.is_empty() {
                break;
            }
            let done = self
                .exchange
                .ingest(partner_id, &envelopes, None, Some(&page.next_cursor))
                .await?;
            out.received += done.received;
            out.duplicates += done.duplicates;
            out.acknowledged_sequence = done.acknowledged;
            let refused = !done.errors.is_empty();
            out.errors.extend(done.errors);
            if refused || !page.has_more {
                break;
            }
        }
        if out.acknowledged_sequence == 0 {
            out.acknowledged_sequence = self
                .exchange
                .sync_status(&[partner_id.to_owned()])
                .await?
                .statuses
                .first()
                .map(|s| s.inbound_sequence)
                .unwrap_or(0);
        }
        Ok(out)
    }

    /// Asks `partner_ids` for their current record about a person of this province, and
    /// with `record_in_risk` passes the outcome to the risk service (the national-check input
    /// of double confirmation). Retry-safe: the answer is kept under the check's reference,
    /// derived from `request_id`, for the audit trail.
    pub async fn national_check(
        &self,
        request_id: &str,
        person_id: &str,
        partner_ids: &[String],
        record_in_risk: bool,
    ) -> Result<pb::NationalCheckResponse, ServiceError> {
        // The reference names this request with what it asks: a request id reused for
        // another person or other partners is another check, never the first one's answer.
        let reference = healthcode_crypto::derived_id(&format!(
            "national-check:{request_id}:{person_id}:{}:{record_in_risk}",
            partner_ids.join(",")
        ));
        let reply_key = format!("national-check:{reference}");
        if let Some(answer) = load(self.exchange.db(), &reply_key)
            .await
            .map_err(db_error)?
        {
            return Ok(answer);
        }
        if record_in_risk && self.risk.is_none() {
            return Err(ServiceError::precondition(
                "NO_RISK_SERVICE",
                "RISK_URL is not configured: a check cannot be recorded in risk",
            ));
        }
        let pseudonym = self.exchange.pseudonym_of(person_id).await?;
        let mut asked = Vec::new();
        for outcome in futures::future::join_all(
            partner_ids
                .iter()
                .map(|id| self.ask(id, request_id, &pseudonym)),
        )
        .await
        {
            // A failure of this service's own (its database) is not the partner's.
            asked.push(outcome?);
        }
        let mut answer = pb::NationalCheckResponse {
            pseudonym: pseudonym.clone(),
            check_reference: reference.clone(),
            ..Default::default()
        };
        let (mut timed_out, mut failed) = (0, 0);
        for (index, (partner_id, outcome)) in partner_ids.iter().zip(asked).enumerate() {
            match outcome {
                Ok((records, unknown)) => {
                    answer.records.extend(records);
                    if unknown {
                        answer.errors.push(item_error(
                            index,
                            partner_id.clone(),
                            tonic::Code::NotFound,
                            "PERSON_NOT_DECIDED",
                            "the partner holds no record about this person".into(),
                        ));
                    }
                }
                Err((code, reason, message)) => {
                    failed += 1;
                    // tonic reports a passed deadline as CANCELLED.
                    if matches!(
                        code,
                        tonic::Code::DeadlineExceeded
                            | tonic::Code::Cancelled
                            | tonic::Code::Unavailable
                    ) {
                        timed_out += 1;
                    }
                    answer.errors.push(item_error(
                        index,
                        partner_id.clone(),
                        code,
                        reason,
                        message,
                    ));
                }
            }
        }
        if timed_out == partner_ids.len() {
            return Err(ServiceError::DeadlineExceeded(
                "no partner answered in time".into(),
            ));
        }
        let now = Utc::now();
        let checked: Vec<(&pb::ExchangeRecord, bool)> = answer
            .records
            .iter()
            .filter_map(|r| r.record.as_ref())
            .map(|r| (r, true))
            .collect();
        if let Some(deciding) = records::deciding(checked, now) {
            answer.color = deciding.color;
            answer.reason_codes = deciding.reason_codes.clone();
        }
        if record_in_risk && failed > timed_out {
            // A partner that refused, or that cannot be asked (unknown, suspended, no
            // certificate): asking again will not mend it.
            return Err(ServiceError::precondition(
                "PARTNER_NOT_USABLE",
                format!(
                    "{} of {} partners refused or cannot be asked; nothing was recorded in risk",
                    failed - timed_out,
                    partner_ids.len()
                ),
            ));
        }
        if record_in_risk && failed > 0 {
            // An unanswered partner is not "nothing held": passing it on would let risk
            // reject a pending change that partner would have confirmed.
            return Err(ServiceError::Unavailable(format!(
                "{failed} of {} partners did not answer; nothing was recorded in risk (retry with the same request_id)",
                partner_ids.len()
            )));
        }
        if record_in_risk && let Some(risk) = &self.risk {
            risk.clone()
                .record_national_check(with_deadline(
                    RecordNationalCheckRequest {
                        request_id: request_id.to_owned(),
                        person: Some(PersonRef {
                            person_id: person_id.to_owned(),
                        }),
                        color: answer.color,
                        reasons: answer
                            .reason_codes
                            .iter()
                            .map(|code| ColorReason {
                                code: *code,
                                color: answer.color,
                                ..Default::default()
                            })
                            .collect(),
                        checked_at: Some(ts(now)),
                        check_reference: reference.clone(),
                    },
                    self.timeout,
                ))
                .await
                .map_err(|s| {
                    tracing::warn!(code = ?s.code(), "risk did not take the national check");
                    ServiceError::Unavailable(
                        "the risk service did not take the check; retry with the same request_id"
                            .into(),
                    )
                })?;
        }
        if !store(self.exchange.db(), &reply_key, &answer)
            .await
            .map_err(db_error)?
            && let Some(first) = load(self.exchange.db(), &reply_key)
                .await
                .map_err(db_error)?
        {
            return Ok(first);
        }
        Ok(answer)
    }

    /// One partner's answer to a national check: its records about `pseudonym`, each
    /// checked like any received record, and whether it knew the person at all.
    async fn ask(
        &self,
        partner_id: &str,
        request_id: &str,
        pseudonym: &str,
    ) -> Result<Asked, ServiceError> {
        let partner = match self.partner_row(partner_id).await {
            Ok(p) => p,
            Err(ServiceError::NotFound(_)) => {
                return Ok(Err((
                    tonic::Code::NotFound,
                    "PARTNER_NOT_FOUND",
                    "no such partner".into(),
                )));
            }
            Err(err) => return Err(err),
        };
        if partner.state != PartnerState::Active as i32 {
            return Ok(Err((
                tonic::Code::FailedPrecondition,
                "PARTNER_SUSPENDED",
                "this partner is suspended".into(),
            )));
        }
        let mut client = match self.client(&partner) {
            Ok(c) => c,
            Err(e) => {
                return Ok(Err((
                    tonic::Code::FailedPrecondition,
                    "NO_OUTBOUND_TLS",
                    e.to_string(),
                )));
            }
        };
        let reply = match client
            .national_check(with_deadline(
                pb::NationalCheckRequest {
                    request_id: request_id.to_owned(),
                    subject: Some(pb::national_check_request::Subject::Pseudonym(
                        pseudonym.to_owned(),
                    )),
                    ..Default::default()
                },
                self.timeout,
            ))
            .await
        {
            Ok(reply) => reply.into_inner(),
            Err(s) => {
                return Ok(Err((
                    s.code(),
                    "PARTNER_UNREACHABLE",
                    format!("the partner answered {:?}", s.code()),
                )));
            }
        };
        // A province answers with its own record; the national platform may relay one per
        // province. More is not an answer.
        if reply.records.len() > MAX_ANSWER_RECORDS {
            return Ok(Err((
                tonic::Code::InvalidArgument,
                "ANSWER_TOO_LARGE",
                format!("the partner answered with {} records", reply.records.len()),
            )));
        }
        let envelopes: Vec<SignedEnvelope> = reply
            .records
            .iter()
            .filter_map(|r| r.envelope.clone())
            .collect();
        let keys = self.exchange.keys_named(&envelopes).await?;
        // The national platform relays provinces' records, each signed by its province.
        let caller =
            (partner.kind != pb::PartnerKind::NationalPlatform as i32).then_some(partner_id);
        let now = Utc::now();
        let mut checked = Vec::new();
        for envelope in envelopes {
            let record = match records::open(&envelope, caller, |id| keys.get(id).cloned(), now) {
                Ok(record) => record,
                Err(e) => return Ok(Err((e.code(), e.reason(), e.to_string()))),
            };
            if record.pseudonym != pseudonym {
                return Ok(Err((
                    tonic::Code::InvalidArgument,
                    "WRONG_PERSON",
                    "the partner answered about another person".into(),
                )));
            }
            checked.push(pb::SignedRecord {
                envelope: Some(envelope),
                record: Some(record),
            });
        }
        let unknown = checked.is_empty();
        Ok(Ok((checked, unknown)))
    }

    /// Takes or renews the lease to follow `partner_id`: true when this replica holds it
    /// (it was free, expired, or already ours). One replica follows each partner.
    pub async fn hold_lease(&self, partner_id: &str) -> Result<bool, ServiceError> {
        use sea_orm::sea_query::{Expr, OnConflict};
        use sea_orm::{Condition, Set};
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(self.lease).unwrap_or_default();
        let renewed = follow_lease::Entity::update_many()
            .col_expr(
                follow_lease::Column::Holder,
                Expr::value(self.holder.clone()),
            )
            .col_expr(follow_lease::Column::ExpiresAt, Expr::value(until))
            .filter(follow_lease::Column::PartnerId.eq(partner_id))
            .filter(
                Condition::any()
                    .add(follow_lease::Column::Holder.eq(self.holder.as_str()))
                    .add(follow_lease::Column::ExpiresAt.lt(now)),
            )
            .exec(self.exchange.db())
            .await
            .map_err(db_error)?;
        if renewed.rows_affected > 0 {
            return Ok(true);
        }
        let inserted = follow_lease::Entity::insert(follow_lease::ActiveModel {
            partner_id: Set(partner_id.to_owned()),
            holder: Set(self.holder.clone()),
            expires_at: Set(until),
        })
        .on_conflict(
            OnConflict::column(follow_lease::Column::PartnerId)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(self.exchange.db())
        .await
        .map_err(db_error)?;
        Ok(inserted > 0)
    }

    /// Gives up every lease this replica holds (at shutdown).
    pub async fn release_leases(&self) -> Result<(), ServiceError> {
        follow_lease::Entity::delete_many()
            .filter(follow_lease::Column::Holder.eq(self.holder.as_str()))
            .exec(self.exchange.db())
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// Follows one real-time partner until it is no longer active and real-time, or the
    /// task is stopped.
    async fn follow(&self, partner_id: String) {
        let mut failures: u32 = 0;
        loop {
            let partner = match self.partner_row(&partner_id).await {
                Ok(p) => p,
                Err(err) => {
                    tracing::warn!(partner = %partner_id, error = %err, "cannot read the partner");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if partner.state != PartnerState::Active as i32
                || partner.sync_mode != SyncMode::RealTime as i32
            {
                return;
            }
            match self.hold_lease(&partner_id).await {
                Ok(true) => {}
                Ok(false) => {
                    // Another replica follows this partner; look again when its lease
                    // would have run out.
                    tokio::time::sleep(self.lease / 2).await;
                    continue;
                }
                Err(err) => {
                    tracing::warn!(partner = %partner_id, error = %err, "cannot take the follow lease");
                    tokio::time::sleep(self.lease / 2).await;
                    continue;
                }
            }
            match self.follow_once(&partner).await {
                Ok(()) => failures = 0,
                Err(err) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(partner = %partner_id, error = %err, failures, "subscription to partner interrupted; resuming from the saved cursor");
                    }
                }
            }
            let backoff = Duration::from_millis(200 * 2u64.saturating_pow(failures.min(8)));
            tokio::time::sleep(backoff.min(Duration::from_secs(30))).await;
        }
    }

    /// One subscription: from the saved cursor until the stream ends or fails.
    async fn follow_once(&self, partner: &partner::Model) -> Result<(), ServiceError> {
        let mut client = self.client(partner)?;
        let cursor = self.exchange.inbound_cursor(&partner.partner_id).await?;
        let mut request = tonic::Request::new(pb::SubscribeRequest { cursor });
        // The deadline covers opening the stream; its life is bounded by heartbeats.
        request.set_timeout(Duration::from_secs(24 * 3600));
        let mut stream = tokio::time::timeout(self.timeout, client.subscribe(request))
            .await
            .map_err(|_| ServiceError::Unavailable("subscribe timed out".into()))?
            .map_err(|s| partner_refusal(&partner.partner_id, &s))?
            .into_inner();
        // The lease is renewed on its own clock, whatever the partner sends; silence is
        // measured from the last item, not from the last renewal.
        let mut renew = tokio::time::interval(self.lease / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.tick().await;
        let mut last_item = tokio::time::Instant::now();
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout_at(last_item + self.idle, stream.message()) => next,
                _ = renew.tick() => {
                    if !self.hold_lease(&partner.partner_id).await? {
                        tracing::info!(partner = %partner.partner_id, "follow lease lost to another replica");
                        return Ok(());
                    }
                    continue;
                }
            };
            last_item = tokio::time::Instant::now();
            let item = match next {
                Err(_) => return Err(ServiceError::Unavailable("the stream went silent".into())),
                Ok(Err(status)) => return Err(partner_refusal(&partner.partner_id, &status)),
                Ok(Ok(None)) => return Ok(()),
                Ok(Ok(Some(item))) => item,
            };
            // Whatever else the stream already holds joins this batch (a catch-up after a
            // cut arrives hundreds at a time): one transaction, not one per record.
            let (mut envelopes, mut cursors) = (Vec::new(), Vec::new());
            let mut take = |item: pb::SubscribeResponse| {
                if let Some(pb::subscribe_response::Item::Record(record)) = item.item
                    && let Some(envelope) = record.envelope
                {
                    envelopes.push(envelope);
                    cursors.push(item.cursor);
                }
            };
            take(item);
            let mut ended: Option<Result<(), ServiceError>> = None;
            for _ in 1..FOLLOW_BATCH {
                match stream.message().now_or_never() {
                    None => break,
                    Some(Ok(Some(item))) => take(item),
                    Some(Ok(None)) => {
                        ended = Some(Ok(()));
                        break;
                    }
                    Some(Err(status)) => {
                        ended = Some(Err(partner_refusal(&partner.partner_id, &status)));
                        break;
                    }
                }
            }
            if !envelopes.is_empty() {
                let done = self
                    .exchange
                    .ingest(&partner.partner_id, &envelopes, Some(&cursors), None)
                    .await?;
                if let Some(error) = done.errors.first() {
                    // The cursor stays before the refused record: reconnecting resends it,
                    // and the stall shows in ListSyncStatus until an operator acts.
                    return Err(ServiceError::precondition(
                        "RECORD_REFUSED",
                        format!("{}: {}", error.reason, error.message),
                    ));
                }
            }
            if let Some(ended) = ended {
                return ended;
            }
        }
    }

    /// Follows every active real-time partner, starting and stopping as the registry
    /// changes, until shut down.
    pub fn spawn(self: Arc<Self>) -> SyncHandle {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut following: HashMap<String, JoinHandle<()>> = HashMap::new();
            loop {
                following.retain(|_, task| !task.is_finished());
                match self.live_partners().await {
                    Ok(ids) => {
                        // A partner suspended or moved to manual sync is dropped at once,
                        // mid-stream if need be (an interrupted batch rolls back whole).
                        following.retain(|id, task| {
                            let live = ids.contains(id);
                            if !live {
                                task.abort();
                            }
                            live
                        });
                        for id in ids {
                            if !following.contains_key(&id) && self.tls.contains_key(&id) {
                                let this = self.clone();
                                let follow_id = id.clone();
                                following.insert(
                                    id,
                                    tokio::spawn(async move { this.follow(follow_id).await }),
                                );
                            }
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "cannot list real-time partners"),
                }
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            for (_, task) in following {
                task.abort();
            }
            // Another replica need not wait for the leases to lapse.
            if let Err(err) = self.release_leases().await {
                tracing::warn!(error = %err, "follow leases not released; they lapse by themselves");
            }
        });
        SyncHandle { stop, task }
    }

    async fn live_partners(&self) -> Result<Vec<String>, ServiceError> {
        Ok(partner::Entity::find()
            .filter(partner::Column::State.eq(PartnerState::Active as i32))
            .filter(partner::Column::SyncMode.eq(SyncMode::RealTime as i32))
            .filter(partner::Column::Endpoint.ne(""))
            // Only provinces and special regions issue records of their own.
            .filter(partner::Column::Kind.is_in([
                pb::PartnerKind::Province as i32,
                pb::PartnerKind::SpecialRegion as i32,
            ]))
            .all(self.exchange.db())
            .await
            .map_err(db_error)?
            .into_iter()
            .map(|p| p.partner_id)
            .collect())
    }
}

/// What a partner's refusal means here: an operator's matter when the partner refuses us
/// (suspended there, our cursor out of its range), a retry when it is unreachable.
fn partner_refusal(partner_id: &str, s: &tonic::Status) -> ServiceError {
    use tonic::Code;
    match s.code() {
        Code::OutOfRange => ServiceError::precondition(
            "PARTNER_CURSOR_OUT_OF_RANGE",
            format!(
                "partner {partner_id} no longer holds or never issued the records after our cursor: an operator must decide"
            ),
        ),
        Code::FailedPrecondition
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::InvalidArgument => ServiceError::precondition(
            "PARTNER_REFUSED",
            format!(
                "partner {partner_id} refused: {:?} {}",
                s.code(),
                s.message()
            ),
        ),
        _ => ServiceError::Unavailable(format!(
            "partner {partner_id} did not answer: {:?}",
            s.code()
        )),
    }
}

pub struct SyncHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl SyncHandle {
    /// Stops following; what was stored stays stored with its cursor.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(err) = self.task.await {
            tracing::warn!(error = %err, "sync task ended abnormally");
        }
    }
}
