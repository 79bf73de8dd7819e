//! Arrival codes: a rail or airport partner asks, ahead of arrival, for the code a traveller
//! will hold in this province. It states the merged color (every province's still-valid
//! records, this one's included), signed with this province's key, valid around the
//! arrival and never beyond the color it states.

use crate::service::Exchange;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, Utc};
use healthcode_db::db_error;
use healthcode_db::replies::{load, store};
use healthcode_errors::ServiceError;
use healthcode_proto::common::v1::{CodeColor, SignedEnvelope};
use healthcode_proto::exchange::v1 as pb;
use healthcode_proto::time::{from_ts, ts};
use prost::Message;

/// The QR text prefix of an arrival code.
pub const QR_PREFIX: &str = "HCA1:";
/// An arrival code is valid this long before and after the expected arrival.
pub const WINDOW_HOURS: i64 = 12;
/// How far ahead a code may be asked for.
pub const MAX_DAYS_AHEAD: i64 = 15;

/// What the transport partner asked, checked by the RPC layer.
pub struct ArrivalRequest<'a> {
    pub partner_id: &'a str,
    pub request_id: &'a str,
    pub pseudonym: &'a str,
    pub destination: &'a str,
    pub mode: i32,
    pub trip_reference: &'a str,
    pub baggage_tag: &'a str,
    pub expected_arrival_at: DateTime<Utc>,
}

/// Where the code issued for `request` is kept. It names what was asked as well: a request
/// id reused for another traveller or trip is another code, never the first one.
fn reply_key(request: &ArrivalRequest<'_>) -> String {
    let asked = format!(
        "{}|{}|{}|{}|{}|{}",
        request.pseudonym,
        request.destination,
        request.mode,
        request.trip_reference,
        request.baggage_tag,
        request.expected_arrival_at.timestamp()
    );
    format!(
        "arrival:{}:{}:{}",
        request.partner_id,
        request.request_id,
        hex::encode(&healthcode_crypto::sm3_digest(asked.as_bytes())[..8])
    )
}

impl Exchange {
    /// The code already issued for this very request, if any: a retry gets it again even
    /// once the arrival has passed.
    pub async fn issued_arrival_code(
        &self,
        request: &ArrivalRequest<'_>,
    ) -> Result<Option<pb::ArrivalCode>, ServiceError> {
        load(self.db(), &reply_key(request)).await.map_err(db_error)
    }

    /// Issues (or, for a retried `request_id` of the same partner, returns again) the
    /// arrival code. FAILED_PRECONDITION `OUT_OF_PROVINCE` for a destination elsewhere,
    /// `NO_VALID_COLOR` when no province holds a valid color for the traveller (never read as
    /// green), `COLOR_EXPIRES_BEFORE_ARRIVAL` when the color runs out before the window.
    pub async fn issue_arrival_code(
        &self,
        request: ArrivalRequest<'_>,
    ) -> Result<pb::ArrivalCode, ServiceError> {
        let reply_key = reply_key(&request);
        if let Some(answer) = load(self.db(), &reply_key).await.map_err(db_error)? {
            return Ok(answer);
        }
        let province = self.province();
        if request.destination.get(..2) != province.get(..2) {
            return Err(ServiceError::precondition(
                "OUT_OF_PROVINCE",
                format!("the destination is not in province {province}"),
            ));
        }
        let now = Utc::now();
        let merged = self.merged_color(request.pseudonym, now).await?;
        if merged.color == CodeColor::Unspecified as i32 {
            return Err(ServiceError::precondition(
                "NO_VALID_COLOR",
                "no province holds a valid color for this traveller; the code is decided on arrival",
            ));
        }
        let arrival = request.expected_arrival_at;
        let valid_from = (arrival - Duration::hours(WINDOW_HOURS)).max(now);
        let mut valid_until = arrival + Duration::hours(WINDOW_HOURS);
        if let Some(color_until) = from_ts(&merged.valid_until) {
            valid_until = valid_until.min(color_until);
        }
        // The color must still hold when the traveller arrives.
        if valid_until <= arrival || valid_until <= valid_from {
            return Err(ServiceError::precondition(
                "COLOR_EXPIRES_BEFORE_ARRIVAL",
                "the traveller's color runs out before the arrival window",
            ));
        }
        let claims = pb::ArrivalCodeClaims {
            arrival_code_id: healthcode_crypto::derived_id(&reply_key),
            pseudonym: request.pseudonym.to_owned(),
            color: merged.color,
            reason_codes: merged.reason_codes,
            destination_division_code: request.destination.to_owned(),
            mode: request.mode,
            trip_reference: request.trip_reference.to_owned(),
            baggage_tag: request.baggage_tag.to_owned(),
            expected_arrival_at: Some(ts(arrival)),
            valid_from: Some(ts(valid_from)),
            valid_until: Some(ts(valid_until)),
            issued_at: Some(ts(now)),
            issuing_province: province.to_owned(),
        };
        let payload = claims.encode_to_vec();
        let signed = SignedEnvelope {
            signature: self
                .signing_key()
                .sign(&payload)
                .map_err(ServiceError::internal)?,
            key_id: self.signing_key().key_id().to_owned(),
            payload,
        };
        let answer = pb::ArrivalCode {
            qr_payload: format!(
                "{QR_PREFIX}{}",
                URL_SAFE_NO_PAD.encode(signed.encode_to_vec())
            ),
            claims: Some(claims),
            signed: Some(signed),
        };
        if !store(self.db(), &reply_key, &answer)
            .await
            .map_err(db_error)?
            && let Some(first) = load(self.db(), &reply_key).await.map_err(db_error)?
        {
            return Ok(first);
        }
        Ok(answer)
    }
}

/// Reads an arrival code's QR text back into its signed envelope (for verifiers and tests).
pub fn decode_qr(text: &str) -> Option<SignedEnvelope> {
    let body = text.strip_prefix(QR_PREFIX)?;
    let bytes = URL_SAFE_NO_PAD.decode(body).ok()?;
    SignedEnvelope::decode(&bytes[..]).ok()
}
