//! Envoy's Secret Discovery Service (SDS v3, `envoy.service.secret.v3.SecretDiscoveryService`),
//! served on the Workload API socket so that an Envoy gets its SVIDs and bundles straight from
//! the agent, rotated in place.
//!
//! Callers are attested exactly like Workload API callers (same pinned connection, same
//! attestor, same entry matching, same re-check before anything is sent): an Envoy gets only the
//! identities its own selectors grant, and the bundles the Workload API would give it. Only the
//! `workload.spiffe.io` header is not asked for: SDS is not a Workload API call and Envoy does not
//! send it (SPIRE's agent does not ask for it either).
//!
//! - `StreamSecrets`: state-of-the-world xDS (see [`stream`] for the ACK/NACK/nonce rules); a
//!   push whenever the secrets the stream asked for change (SVID rotation, bundle change).
//! - `FetchSecrets`: one answer, empty version, no nonce.
//! - `DeltaSecrets`: `Unimplemented` (Envoy falls back to state of the world, as with SPIRE).
//!
//! Which secret each resource name means is in [`resources`].

pub mod resources;
pub mod stream;

use std::sync::Arc;

use tessera_proto::xds::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tessera_proto::xds::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use tessera_workload_attest::Attestation;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::Snapshot;
use crate::config::SdsConfig;
use crate::workload_api::{WorkloadApi, WorkloadApiError, to_status, view};
use resources::{SdsError, Validation};
use stream::{Received, StreamState};

/// The SDS service. Cheap to clone; shares everything with the [`WorkloadApi`] it was made from
/// (cache, attestor, metrics, shutdown signal, SDS names).
#[derive(Debug, Clone)]
pub struct SecretDiscovery {
    api: WorkloadApi,
}

impl SecretDiscovery {
    pub fn new(api: WorkloadApi) -> Self {
        Self { api }
    }

    /// The tonic service, mounted next to the Workload API by `workload_api::serve`.
    pub fn into_service(self) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(self)
    }

    async fn attest<T>(&self, req: &Request<T>) -> Result<Arc<Attestation>, Status> {
        let peer = self.api.sds_caller(req).map_err(to_status)?;
        self.api.attest(peer).await.map(Arc::new).map_err(to_status)
    }

    fn count_response(&self) {
        if let Some(m) = self.api.metrics() {
            m.sds_responses.inc();
        }
    }
}

/// The secrets for `names`, for a caller with `attestation`'s selectors, from `snapshot`.
fn secrets_for(
    snapshot: &Snapshot,
    attestation: &Attestation,
    config: &SdsConfig,
    names: &[String],
    validation: Validation,
) -> Result<Vec<prost_types::Any>, SdsError> {
    let identities = view::identities_for(snapshot, attestation.selectors());
    resources::secrets(snapshot, &identities, config, names, validation)
}

/// The one mapping from SDS errors to gRPC status codes.
fn sds_status(e: SdsError) -> Status {
    let code = match &e {
        // The names (or type) asked for are not this caller's: the request is wrong.
        SdsError::Unauthorized(_)
        | SdsError::AllNeedsSpiffeValidator(_)
        | SdsError::WrongType(_) => Code::InvalidArgument,
        // As the Workload API (SPIFFE Workload Endpoint §6).
        SdsError::NoIdentity => return to_status(WorkloadApiError::NoIdentity),
        // The agent has not synced yet: Envoy retries.
        SdsError::MissingBundle(_) => Code::Unavailable,
    };
    Status::new(code, e.to_string())
}

/// A fresh random nonce (xDS: opaque, unique per response on a stream).
fn nonce() -> Result<String, Status> {
    let mut bytes = [0u8; 12];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| Status::internal("the system random generator failed"))?;
    Ok(hex::encode(bytes))
}

/// Counts an open stream in the metrics while it lives.
struct StreamGauge(Option<prometheus_client::metrics::gauge::Gauge>);

impl StreamGauge {
    fn new(gauge: Option<prometheus_client::metrics::gauge::Gauge>) -> Self {
        if let Some(g) = &gauge {
            g.inc();
        }
        Self(gauge)
    }
}

impl Drop for StreamGauge {
    fn drop(&mut self) {
        if let Some(g) = &self.0 {
            g.dec();
        }
    }
}

/// What woke the stream's task up.
enum Event {
    Request(Box<DiscoveryRequest>),
    SnapshotChanged,
}

impl SecretDiscovery {
    /// One stream's task: reads Envoy's requests and cache changes, sends responses, ends when
    /// Envoy goes away, on an error (sent as the stream's status), or when the agent stops.
    async fn run_stream(
        self,
        attestation: Arc<Attestation>,
        mut requests: Streaming<DiscoveryRequest>,
        tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
        _gauge: StreamGauge,
    ) {
        let config = self.api.sds_config();
        let mut snapshots = self.api.cache().subscribe();
        let mut stop = self.api.stop_signal();
        let mut state = StreamState::default();
        loop {
            let event = tokio::select! {
                () = tx.closed() => return,
                _ = stop.wait_for(|stopped| *stopped) => {
                    let _ = tx.try_send(Err(to_status(WorkloadApiError::ShuttingDown)));
                    return;
                }
                message = requests.message() => match message {
                    Ok(Some(req)) => Event::Request(Box::new(req)),
                    // Envoy closed its side, or the connection broke: nothing more to answer.
                    Ok(None) => return,
                    Err(status) => {
                        tracing::debug!(code = ?status.code(), reason = status.message(), "SDS stream ended by the client");
                        return;
                    }
                },
                changed = snapshots.changed() => if changed.is_err() {
                    let _ = tx.try_send(Err(to_status(WorkloadApiError::ShuttingDown)));
                    return;
                } else {
                    Event::SnapshotChanged
                },
            };
            let subscribe = match event {
                Event::Request(req) => {
                    if let Err(e) = resources::check_type_url(&req.type_url) {
                        let _ = tx.send(Err(sds_status(e))).await;
                        return;
                    }
                    let received = state.on_request(&req);
                    log_request(&req, &received);
                    // A NACK, also one that comes with new names.
                    let nack = matches!(received, Received::Nack(_))
                        || (received == Received::Subscribe && req.error_detail.is_some());
                    if let (true, Some(m)) = (nack, self.api.metrics()) {
                        m.sds_nacks.inc();
                    }
                    if !received.needs_response() {
                        continue;
                    }
                    true
                }
                Event::SnapshotChanged => false,
            };
            // Nothing asked for yet: a cache change has nobody to go to.
            let Some(names) = state.names().map(<[String]>::to_vec) else {
                continue;
            };
            let snapshot = snapshots.borrow_and_update().clone();
            let validation =
                resources::validation_for(state.node(), config.disable_spiffe_cert_validation);
            let secrets = match secrets_for(&snapshot, &attestation, &config, &names, validation) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, names = ?names, "SDS request refused");
                    let _ = tx.send(Err(sds_status(e))).await;
                    return;
                }
            };
            // A cache change that does not change this stream's secrets is not pushed.
            if !subscribe && !state.differs(&secrets) {
                continue;
            }
            // PID reuse between attestation and now must never hand out a key.
            if let Err(e) = self.api.recheck(attestation.clone()).await {
                let _ = tx.send(Err(to_status(e))).await;
                return;
            }
            let nonce = match nonce() {
                Ok(n) => n,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            };
            let response = state.respond(secrets, nonce);
            tracing::debug!(
                version = %response.version_info,
                nonce = %response.nonce,
                resources = response.resources.len(),
                "SDS response"
            );
            tokio::select! {
                biased;
                sent = tx.send(Ok(response)) => if sent.is_err() { return },
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
            self.count_response();
        }
    }
}

fn log_request(req: &DiscoveryRequest, received: &Received) {
    match received {
        Received::Subscribe => tracing::debug!(
            names = ?req.resource_names,
            version = %req.version_info,
            nonce = %req.response_nonce,
            "SDS request"
        ),
        Received::Ack => tracing::debug!(version = %req.version_info, "SDS ACK"),
        // xDS: a NACK keeps Envoy on the previous secrets; the operator must see why.
        Received::Nack(reason) => tracing::error!(
            names = ?req.resource_names,
            version = %req.version_info,
            reason = %reason,
            "Envoy rejected the secrets sent (NACK)"
        ),
        Received::Stale { nonce, expected } => tracing::debug!(
            %nonce,
            %expected,
            "SDS request for an older response; ignored"
        ),
    }
    // A Subscribe can carry a NACK of the previous response too.
    if let (Received::Subscribe, Some(detail)) = (received, &req.error_detail) {
        tracing::error!(
            names = ?req.resource_names,
            reason = %detail.message,
            "Envoy rejected the secrets sent (NACK)"
        );
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for SecretDiscovery {
    type DeltaSecretsStream = tokio_stream::Empty<Result<DeltaDiscoveryResponse, Status>>;
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    /// Incremental xDS is not served; Envoy uses StreamSecrets.
    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "DeltaSecrets is not implemented; use StreamSecrets",
        ))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let attestation = self.attest(&request).await?;
        let (tx, rx) = mpsc::channel(1);
        // Counted from now until the stream's task ends.
        let gauge = StreamGauge::new(self.api.metrics().map(|m| m.sds_streams.clone()));
        tokio::spawn(
            self.clone()
                .run_stream(attestation, request.into_inner(), tx, gauge),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let attestation = self.attest(&request).await?;
        let req = request.into_inner();
        resources::check_type_url(&req.type_url).map_err(sds_status)?;
        let config = self.api.sds_config();
        let validation =
            resources::validation_for(req.node.as_ref(), config.disable_spiffe_cert_validation);
        let snapshot = self.api.cache().current();
        let secrets = secrets_for(
            &snapshot,
            &attestation,
            &config,
            &req.resource_names,
            validation,
        )
        .map_err(sds_status)?;
        self.api.recheck(attestation).await.map_err(to_status)?;
        self.count_response();
        // xDS: FetchSecrets answers carry no version and no nonce.
        Ok(Response::new(DiscoveryResponse {
            version_info: String::new(),
            resources: secrets,
            canary: false,
            type_url: resources::SECRET_TYPE_URL.to_owned(),
            nonce: String::new(),
        }))
    }
}
