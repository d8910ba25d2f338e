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
use tessera_tls::{ExpectedPeer, SharedBundles, SpiffeServerVerifier, SvidResolver};
use tonic::transport::{Channel, Endpoint, Uri};

/// Connects to the admin API on `socket`.
pub async fn admin(socket: &Path) -> Result<AdminApiClient<Channel>, tonic::transport::Error> {
    let path = socket.to_path_buf();
    // The URI is required by the API but unused: the connector always dials the socket.
    let channel = Endpoint::from_static("http://[::1]:0")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await?;
    Ok(AdminApiClient::new(channel))
}

/// Connects to the agent API at `addr`. The server must present an SVID of `server_id` that
/// verifies against `bundles`; `identity` is the agent SVID (none for node attestation).
pub async fn agent_api(
    addr: SocketAddr,
    bundles: SharedBundles,
    server_id: SpiffeId,
    identity: Option<Arc<SvidResolver>>,
) -> Result<AgentApiClient<Channel>, tonic::transport::Error> {
    let verifier = Arc::new(SpiffeServerVerifier::new(
        bundles,
        ExpectedPeer::Exact(server_id),
    ));
    let tls = match tessera_tls::client_config(verifier, identity, &[b"h2"]) {
        Ok(c) => Arc::new(c),
        // Building a TLS 1.3 config from our own provider cannot fail; if it ever does, every
        // connection attempt reports it.
        Err(e) => {
            let msg = e.to_string();
            let channel =
                Endpoint::from_static("http://tessera-server")
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let msg = msg.clone();
                        async move {
                            Err::<TokioIo<tokio::net::TcpStream>, _>(std::io::Error::other(msg))
                        }
                    }))
                    .await?;
            return Ok(AgentApiClient::new(channel));
        }
    };
    let channel = Endpoint::from_static("http://tessera-server")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
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
        }))
        .await?;
    Ok(AgentApiClient::new(channel))
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
