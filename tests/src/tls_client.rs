//! The reference client over TLS (rustls, no code shared with the probe): the same request, the
//! same response reading and event timing as `client`, with the kernel's receive stamp of the
//! segment that completed the TLS record holding an event. rustls decrypts whole records, so the
//! stamp is the one of the last read before the plaintext appeared; a server that writes one
//! event per `SSL_write` puts each event in its own record.
//!
//! The test certificate is self-signed and accepted as it is: the client checks timing, not
//! identity (nothing here leaves 127.0.0.1).

use std::{
    io::{Read as _, Write as _},
    sync::Arc,
};

use probe_common::clock::monotonic_ns;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
    ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme,
};
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

use crate::client::{
    enable_rx_timestamps, read_stamped, request_bytes, Req, ResponseReader, Sample,
};

#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client configuration that accepts the test's self-signed certificate (any certificate).
pub fn config() -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    Arc::new(cfg)
}

/// An established TLS session over a TCP socket with receive stamps.
pub struct TlsSession {
    sock: TcpStream,
    tls: ClientConnection,
    raw: Vec<u8>,
}

impl TlsSession {
    /// Connect and complete the handshake.
    pub async fn connect(addr: &str) -> anyhow::Result<Self> {
        let sock = TcpStream::connect(addr).await?;
        sock.set_nodelay(true)?;
        enable_rx_timestamps(&sock)?;
        let tls = ClientConnection::new(config(), ServerName::try_from("localhost")?.to_owned())?;
        let mut me = Self {
            sock,
            tls,
            raw: vec![0u8; 64 * 1024],
        };
        while me.tls.is_handshaking() {
            me.flush().await?;
            if me.tls.is_handshaking() && me.tls.wants_read() {
                anyhow::ensure!(me.read_raw().await?.0 > 0, "closed in the handshake");
            }
        }
        me.flush().await?;
        Ok(me)
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        while self.tls.wants_write() {
            let mut out = Vec::new();
            self.tls.write_tls(&mut out)?;
            self.sock.write_all(&out).await?;
        }
        Ok(())
    }

    /// One socket read fed to rustls: (bytes read, the read's receive stamp).
    async fn read_raw(&mut self) -> anyhow::Result<(usize, Option<u64>)> {
        let (n, stamp) = read_stamped(&self.sock, &mut self.raw, false).await?;
        let mut bytes = &self.raw[..n];
        while !bytes.is_empty() {
            self.tls.read_tls(&mut bytes)?;
            self.tls.process_new_packets()?;
        }
        Ok((n, stamp))
    }

    /// Encrypts `bytes` and writes them in one `write`; returns the time just before it (the
    /// request's start, as the plain client's is just before its `write`).
    pub async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<u64> {
        self.tls.writer().write_all(bytes)?;
        let mut out = Vec::new();
        while self.tls.wants_write() {
            self.tls.write_tls(&mut out)?;
        }
        let at = monotonic_ns();
        self.sock.write_all(&out).await?;
        Ok(at)
    }

    /// Plaintext that arrived: (bytes, the stamp of the read that completed them); empty at EOF.
    pub async fn recv(&mut self) -> anyhow::Result<(Vec<u8>, Option<u64>)> {
        loop {
            let (n, stamp) = self.read_raw().await?;
            let mut plain = Vec::new();
            match self.tls.reader().read_to_end(&mut plain) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
            if !plain.is_empty() || n == 0 {
                return Ok((plain, stamp));
            }
            self.flush().await?; // session tickets, key updates
        }
    }
}

/// [`crate::client::run`] over TLS (a new connection per request).
pub async fn run(addr: &str, req: &Req) -> Sample {
    let mut s = Sample {
        request_id: req.request_id.clone(),
        ..Sample::default()
    };
    match tokio::time::timeout(req.timeout, run_inner(addr, req, &mut s)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => s.error = Some(format!("{e:#}")),
        Err(_) => s.error = Some("timeout".into()),
    }
    s
}

async fn run_inner(addr: &str, req: &Req, s: &mut Sample) -> anyhow::Result<()> {
    let mut session = TlsSession::connect(addr).await?;
    exchange_inner(&mut session, addr, req, s).await
}

/// One request on an open session (keep-alive: the session stays usable after it).
pub async fn exchange(session: &mut TlsSession, addr: &str, req: &Req) -> Sample {
    let mut s = Sample {
        request_id: req.request_id.clone(),
        ..Sample::default()
    };
    let run = exchange_inner(session, addr, req, &mut s);
    match tokio::time::timeout(req.timeout, run).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => s.error = Some(format!("{e:#}")),
        Err(_) => s.error = Some("timeout".into()),
    }
    s
}

async fn exchange_inner(
    session: &mut TlsSession,
    addr: &str,
    req: &Req,
    s: &mut Sample,
) -> anyhow::Result<()> {
    let msg = request_bytes(addr, req);
    s.start_ns = session.send(&msg).await?;
    let mut reader = ResponseReader::default();
    loop {
        let (plain, stamp) = session.recv().await?;
        let now = stamp.unwrap_or_else(|| {
            s.unstamped_reads += 1;
            monotonic_ns()
        });
        if plain.is_empty() {
            return reader.at_eof(s);
        }
        if reader.feed(&plain, now, s, req)? {
            return Ok(());
        }
    }
}

/// A self-signed certificate and its key in a directory of their own, removed on drop (keep it
/// alive for as long as a server may read them).
pub struct SelfSigned {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Drop for SelfSigned {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A self-signed P-256 certificate for `localhost` in a fresh directory.
pub fn self_signed_cert(tag: &str) -> SelfSigned {
    let dir = std::env::temp_dir().join(format!("llm-probe-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("cert dir");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    crate::output_ok(
        "openssl req",
        std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=localhost", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    SelfSigned { cert, key, dir }
}
