//! Clients of the server's two APIs, shared by the CLI, the agent and the tests: the admin API on
//! its Unix socket, and the agent API over mTLS verifying the server's SVID.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tessera_proto::v1::admin_api_client::AdminApiClient;
use tessera_proto::v1::agent_api_client::AgentApiClient;
use tessera_spiffe::SpiffeId;
use tessera_tls::{
    ExpectedPeer, InsecureBootstrapVerifier, SharedBundles, SpiffeServerVerifier, SvidResolver,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// How long a call on a [`unix_channel`] waits for the head of its answer.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// An HTTP/2 channel to a gRPC server on a Unix socket (the admin socket, the Workload API).
///
/// Connecting gives up after 5 s and each call after 30 s without an answer (the head of the
/// response; a stream's messages may come later): a socket whose process accepts and never
/// answers must not hang a command forever.
pub async fn unix_channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = socket.to_path_buf();
    // The URI is required by the API but unused: the connector always dials the socket.
    Endpoint::from_static("http://[::1]:0")
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(CALL_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}

/// Connects to the admin API on `socket`.
pub async fn admin(socket: &Path) -> Result<AdminApiClient<Channel>, tonic::transport::Error> {
    Ok(AdminApiClient::new(unix_channel(socket).await?))
}

/// How an agent trusts the server it connects to.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// The server's SVID must verify against these bundles.
    Bundles(SharedBundles),
    /// First contact without a bundle (`insecure_bootstrap`): only the server's ID is checked.
    InsecureBootstrap,
}

/// A client of the agent API at `addr`. The server must present an SVID of `server_id` (trusted
/// as `trust` says); `identity` is the agent SVID (none for node attestation). The connection is
/// made on first use and re-made after failures, so a client outlives server restarts.
pub fn agent_api(
    addr: SocketAddr,
    trust: ServerTrust,
    server_id: SpiffeId,
    identity: Option<Arc<SvidResolver>>,
) -> Result<AgentApiClient<Channel>, rustls::Error> {
    agent_api_on(endpoint(), addr, trust, server_id, identity)
}

/// [`agent_api`] over `endpoint`, which is [`endpoint`] with settings of the caller's on top
/// (tests give a stream a small HTTP/2 window to hold the server's Sync loop).
pub fn agent_api_on(
    endpoint: Endpoint,
    addr: SocketAddr,
    trust: ServerTrust,
    server_id: SpiffeId,
    identity: Option<Arc<SvidResolver>>,
) -> Result<AgentApiClient<Channel>, rustls::Error> {
    Ok(AgentApiClient::new(tls_channel(
        endpoint, addr, trust, server_id, identity,
    )?))
}

/// A client of the admin API over mTLS (`admin_bind_address`), presenting `identity`, which must
/// be the X509-SVID of an entry marked admin.
pub fn admin_tls(
    addr: SocketAddr,
    trust: ServerTrust,
    server_id: SpiffeId,
    identity: Arc<SvidResolver>,
) -> Result<AdminApiClient<Channel>, rustls::Error> {
    Ok(AdminApiClient::new(tls_channel(
        endpoint(),
        addr,
        trust,
        server_id,
        Some(identity),
    )?))
}

/// The HTTP/2 settings of every client of a Tessera server's TCP APIs.
pub fn endpoint() -> Endpoint {
    Endpoint::from_static("http://tessera-server")
        .connect_timeout(std::time::Duration::from_secs(5))
        // HTTP/2 pings: a server that hangs or drops off the network without closing the
        // connection fails the agent's Sync stream within ~15 s, so the agent moves to another
        // server (`server_addresses`) instead of waiting on a dead one forever.
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(5))
        .keep_alive_while_idle(true)
}

/// A channel on `endpoint` over TLS 1.3 to a Tessera server, connected on first use.
fn tls_channel(
    endpoint: Endpoint,
    addr: SocketAddr,
    trust: ServerTrust,
    server_id: SpiffeId,
    identity: Option<Arc<SvidResolver>>,
) -> Result<Channel, rustls::Error> {
    let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = match trust {
        ServerTrust::Bundles(b) => {
            Arc::new(SpiffeServerVerifier::new(b, ExpectedPeer::Exact(server_id)))
        }
        ServerTrust::InsecureBootstrap => Arc::new(InsecureBootstrapVerifier::new(server_id)),
    };
    let tls = Arc::new(tessera_tls::client_config(verifier, identity, &[b"h2"])?);
    let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
        let tls = tls.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            // The name is not checked (the verifier checks the SPIFFE ID); it only fills SNI.
            let name = ServerName::try_from("tessera-server").map_err(std::io::Error::other)?;
            let conn = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(conn))
        }
    }));
    Ok(channel)
}

/// Node attestation with a join token: sends the token and a CSR for the agent SVID and returns
/// the server's answer (agent ID, SVID, bundle).
pub async fn attest_join_token(
    client: &mut AgentApiClient<Channel>,
    token: &str,
    csr: Vec<u8>,
) -> Result<tessera_proto::v1::AttestResult, tonic::Status> {
    use tessera_proto::v1 as pb;
    use tokio_stream::StreamExt as _;
    let first = pb::AttestAgentRequest {
        step: Some(pb::attest_agent_request::Step::Params(pb::AttestParams {
            method: "join_token".into(),
            payload: vec![token.as_bytes().to_vec()],
            csr,
        })),
    };
    let mut answers = client
        .attest_agent(tokio_stream::iter(vec![first]))
        .await?
        .into_inner();
    match answers.next().await {
        Some(Ok(pb::AttestAgentResponse {
            step: Some(pb::attest_agent_response::Step::Result(r)),
        })) => Ok(r),
        Some(Err(e)) => Err(e),
        Some(Ok(_)) => Err(tonic::Status::internal(
            "the server asked for a challenge during join_token attestation",
        )),
        None => Err(tonic::Status::unavailable(
            "the server closed the attestation stream",
        )),
    }
}

/// Node attestation with x509pop: sends the node certificate chain (DER, leaf first) and a CSR,
/// signs the server's challenge (prefixed with [`tessera_tls::x509pop::CHALLENGE_CONTEXT`]) with
/// `sign`, and returns the server's answer.
pub async fn attest_x509pop(
    client: &mut AgentApiClient<Channel>,
    node_chain: Vec<Vec<u8>>,
    csr: Vec<u8>,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, String>,
) -> Result<tessera_proto::v1::AttestResult, tonic::Status> {
    use tessera_proto::v1 as pb;
    use tokio_stream::StreamExt as _;
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let first = pb::AttestAgentRequest {
        step: Some(pb::attest_agent_request::Step::Params(pb::AttestParams {
            method: "x509pop".into(),
            payload: node_chain,
            csr,
        })),
    };
    tx.send(first)
        .await
        .map_err(|_| tonic::Status::internal("attestation request stream closed"))?;
    let mut answers = client
        .attest_agent(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let challenge = match answers.next().await {
        Some(Ok(pb::AttestAgentResponse {
            step: Some(pb::attest_agent_response::Step::Challenge(c)),
        })) => c,
        Some(Err(e)) => return Err(e),
        _ => return Err(tonic::Status::internal("expected an x509pop challenge")),
    };
    let mut msg = tessera_tls::x509pop::CHALLENGE_CONTEXT.to_vec();
    msg.extend_from_slice(&challenge);
    let signature = sign(&msg).map_err(tonic::Status::internal)?;
    tx.send(pb::AttestAgentRequest {
        step: Some(pb::attest_agent_request::Step::ChallengeResponse(signature)),
    })
    .await
    .map_err(|_| tonic::Status::internal("attestation request stream closed"))?;
    match answers.next().await {
        Some(Ok(pb::AttestAgentResponse {
            step: Some(pb::attest_agent_response::Step::Result(r)),
        })) => Ok(r),
        Some(Err(e)) => Err(e),
        _ => Err(tonic::Status::unavailable(
            "the server closed the attestation stream",
        )),
    }
}
