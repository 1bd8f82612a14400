//! The webhook's TLS without cert-manager: the controller makes a CA (10 years) and a serving
//! certificate it signs (1 year, for the webhook's address or Service name), keeps both in a
//! Secret so every replica and restart serves the same CA, and renews the serving certificate 30
//! days before it expires (the CA 1 year before). The CA's PEM is what the webhook
//! configurations' `caBundle` carries.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use kube::core::ObjectMeta;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Serving certificates are renewed this long before they expire.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
const LEAF_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const CA_RENEW_BEFORE: Duration = Duration::from_secs(365 * 24 * 3600);
const ANNO_NOT_AFTER: &str = "spiderpool.spidernet.io/not-after";
const ANNO_CA_NOT_AFTER: &str = "spiderpool.spidernet.io/ca-not-after";
const ANNO_HOSTS: &str = "spiderpool.spidernet.io/hosts";
const ANNO_PREVIOUS_CA_NOT_AFTER: &str = "spiderpool.spidernet.io/previous-ca-not-after";

/// A CA and the serving certificate it signed, PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certs {
    /// The CA certificate (the `caBundle`).
    pub ca_pem: String,
    /// The CA's private key.
    pub ca_key_pem: String,
    /// The serving certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
    /// Serving certificate expiry, seconds since the epoch.
    pub not_after: u64,
    /// CA expiry, seconds since the epoch.
    pub ca_not_after: u64,
    /// The names and addresses the serving certificate is for.
    pub hosts: Vec<String>,
    /// The CA this one replaced, while it is still valid: kept in the `caBundle` so replicas
    /// still serving a certificate it signed pass admission until they take the new one.
    pub previous_ca_pem: Option<String>,
    /// When the previous CA expires, seconds since the epoch.
    pub previous_ca_not_after: u64,
}

impl Certs {
    /// The webhook configurations' `caBundle`: this CA, and the one it replaced while valid.
    pub fn ca_bundle(&self) -> String {
        let mut out = self.ca_pem.clone();
        if let Some(prev) = &self.previous_ca_pem {
            if !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(prev);
        }
        out
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn odt(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs(t) as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn ca_params(now: SystemTime) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "spiderpool-controller-ca");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = odt(now - Duration::from_secs(3600));
    p.not_after = odt(now + CA_LIFETIME);
    p
}

fn err(e: impl std::fmt::Display) -> String {
    format!("certificate: {e}")
}

/// A serving certificate for `hosts` (DNS names or IP addresses) signed by the CA whose key is
/// `ca_key_pem`.
fn issue(
    ca_key_pem: &str,
    hosts: &[String],
    now: SystemTime,
) -> Result<(String, String, u64), String> {
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(err)?;
    let issuer = Issuer::new(ca_params(now), ca_key);
    let key = KeyPair::generate().map_err(err)?;
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "spiderpool-controller");
    for h in hosts {
        p.subject_alt_names.push(match h.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(h.clone().try_into().map_err(err)?),
        });
    }
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.not_before = odt(now - Duration::from_secs(3600));
    let not_after = now + LEAF_LIFETIME;
    p.not_after = odt(not_after);
    let cert = p.signed_by(&key, &issuer).map_err(err)?;
    Ok((cert.pem(), key.serialize_pem(), secs(not_after)))
}

/// A new CA and a serving certificate for `hosts`.
pub fn generate(hosts: &[String], now: SystemTime) -> Result<Certs, String> {
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca = ca_params(now).self_signed(&ca_key).map_err(err)?;
    let ca_key_pem = ca_key.serialize_pem();
    let (cert_pem, key_pem, not_after) = issue(&ca_key_pem, hosts, now)?;
    Ok(Certs {
        ca_pem: ca.pem(),
        ca_key_pem,
        cert_pem,
        key_pem,
        not_after,
        ca_not_after: secs(now + CA_LIFETIME),
        hosts: hosts.to_vec(),
        previous_ca_pem: None,
        previous_ca_not_after: 0,
    })
}

/// What to do with stored certificates: keep them, re-issue the serving certificate with the
/// same CA (expiring, or for other hosts), or start over (no CA, or the CA expiring).
pub fn renew(
    stored: Option<Certs>,
    hosts: &[String],
    now: SystemTime,
) -> Result<(Certs, bool), String> {
    let n = secs(now);
    match stored {
        Some(mut c) if c.ca_not_after > n + CA_RENEW_BEFORE.as_secs() => {
            let expired_previous = c.previous_ca_pem.is_some() && c.previous_ca_not_after <= n;
            if expired_previous {
                c.previous_ca_pem = None;
                c.previous_ca_not_after = 0;
            }
            if c.not_after > n + RENEW_BEFORE.as_secs() && c.hosts == hosts {
                return Ok((c, expired_previous));
            }
            let (cert_pem, key_pem, not_after) = issue(&c.ca_key_pem, hosts, now)?;
            Ok((
                Certs {
                    cert_pem,
                    key_pem,
                    not_after,
                    hosts: hosts.to_vec(),
                    ..c
                },
                true,
            ))
        }
        // A new CA; the old one stays in the bundle while it is valid.
        Some(old) if old.ca_not_after > n => {
            let mut fresh = generate(hosts, now)?;
            fresh.previous_ca_pem = Some(old.ca_pem);
            fresh.previous_ca_not_after = old.ca_not_after;
            Ok((fresh, true))
        }
        _ => Ok((generate(hosts, now)?, true)),
    }
}

fn to_secret(name: &str, namespace: &str, c: &Certs, resource_version: Option<String>) -> Secret {
    let data: BTreeMap<String, ByteString> = [
        ("ca.crt", &c.ca_pem),
        ("ca.key", &c.ca_key_pem),
        ("tls.crt", &c.cert_pem),
        ("tls.key", &c.key_pem),
    ]
    .into_iter()
    .chain(c.previous_ca_pem.iter().map(|p| ("ca-previous.crt", p)))
    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
    .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            resource_version,
            annotations: Some(
                [
                    (ANNO_NOT_AFTER.to_string(), c.not_after.to_string()),
                    (ANNO_CA_NOT_AFTER.to_string(), c.ca_not_after.to_string()),
                    (ANNO_HOSTS.to_string(), c.hosts.join(",")),
                    (
                        ANNO_PREVIOUS_CA_NOT_AFTER.to_string(),
                        c.previous_ca_not_after.to_string(),
                    ),
                ]
                .into(),
            ),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    }
}

fn from_secret(s: &Secret) -> Option<Certs> {
    let data = s.data.as_ref()?;
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    let annos = s.metadata.annotations.as_ref()?;
    let num = |k: &str| annos.get(k).and_then(|v| v.parse::<u64>().ok());
    Some(Certs {
        ca_pem: text("ca.crt")?,
        ca_key_pem: text("ca.key")?,
        cert_pem: text("tls.crt")?,
        key_pem: text("tls.key")?,
        not_after: num(ANNO_NOT_AFTER)?,
        ca_not_after: num(ANNO_CA_NOT_AFTER)?,
        hosts: annos
            .get(ANNO_HOSTS)
            .map(|h| {
                h.split(',')
                    .filter(|x| !x.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
        previous_ca_pem: text("ca-previous.crt"),
        previous_ca_not_after: num(ANNO_PREVIOUS_CA_NOT_AFTER).unwrap_or(0),
    })
}

/// The certificates in force: read from the Secret `namespace/name`, renewed when due, written
/// back (compare-and-swap: with several replicas the first writer wins and the others take its
/// certificates).
pub async fn ensure(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    hosts: &[String],
) -> Result<Certs, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for _ in 0..5 {
        let current = api
            .get_opt(name)
            .await
            .map_err(|e| format!("reading Secret {namespace}/{name}: {e}"))?;
        let rv = current
            .as_ref()
            .and_then(|s| s.metadata.resource_version.clone());
        let stored = current.as_ref().and_then(from_secret);
        let (certs, changed) = renew(stored, hosts, SystemTime::now())?;
        if !changed {
            return Ok(certs);
        }
        let mut secret = to_secret(name, namespace, &certs, rv.clone());
        // A Secret's type cannot change: keep the one it was made with (the shipped one is
        // Opaque; earlier releases made kubernetes.io/tls).
        if let Some(t) = current.as_ref().and_then(|c| c.type_.clone()) {
            secret.type_ = Some(t);
        }
        let res = match rv {
            None => api.create(&PostParams::default(), &secret).await,
            Some(_) => api.replace(name, &PostParams::default(), &secret).await,
        };
        match res {
            Ok(_) => {
                tracing::info!(secret = %format!("{namespace}/{name}"), not_after = certs.not_after, "webhook certificate issued");
                return Ok(certs);
            }
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(kube::Error::Api(e)) if e.code == 403 => {
                return Err(format!(
                    "writing Secret {namespace}/{name}: forbidden ({}); the controller may only update this Secret, by name: apply deploy/kubernetes/controller.yaml, which ships it (and match its resourceNames to --secret)",
                    e.message
                ))
            }
            Err(e) => return Err(format!("writing Secret {namespace}/{name}: {e}")),
        }
    }
    Err(format!("Secret {namespace}/{name} kept changing"))
}

/// A rustls server configuration serving `certs` (chain: serving certificate, CA).
pub fn server_config(certs: &Certs) -> Result<tokio_rustls::rustls::ServerConfig, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = [certs.cert_pem.as_bytes(), certs.ca_pem.as_bytes()]
        .into_iter()
        .map(|pem| CertificateDer::from_pem_slice(pem).map_err(err))
        .collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(certs.key_pem.as_bytes()).map_err(err)?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(err)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(err)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_keeps_the_ca_and_rotates_before_expiry() {
        let hosts = vec!["127.0.0.1".to_string()];
        let t0 = SystemTime::now();
        let first = generate(&hosts, t0).expect("generate");
        assert!(server_config(&first).is_ok());
        let (same, changed) = renew(Some(first.clone()), &hosts, t0).expect("renew");
        assert!(!changed);
        assert_eq!(same, first);
        // 340 days later: within 30 days of expiry, re-issued under the same CA.
        let later = t0 + Duration::from_secs(340 * 24 * 3600);
        let (rotated, changed) = renew(Some(first.clone()), &hosts, later).expect("renew");
        assert!(changed);
        assert_eq!(rotated.ca_pem, first.ca_pem, "the caBundle stays");
        assert_ne!(rotated.cert_pem, first.cert_pem);
        assert!(rotated.not_after > first.not_after);
        // Other hosts: re-issued too.
        let (other, changed) =
            renew(Some(first.clone()), &["localhost".into()], t0).expect("renew");
        assert!(changed && other.ca_pem == first.ca_pem);
        // The CA itself near its end: a new CA.
        let late = t0 + Duration::from_secs(9 * 365 * 24 * 3600 + 200 * 24 * 3600);
        let (fresh, changed) = renew(Some(first.clone()), &hosts, late).expect("renew");
        assert!(changed && fresh.ca_pem != first.ca_pem);
        // The old CA stays in the bundle (replicas still serving its certificate pass), and
        // leaves it once it has expired.
        let bundle = fresh.ca_bundle();
        assert!(bundle.contains(&fresh.ca_pem) && bundle.contains(&first.ca_pem));
        let s = to_secret("n", "ns", &fresh, None);
        assert_eq!(from_secret(&s).as_ref(), Some(&fresh));
        let after = t0 + Duration::from_secs(10 * 365 * 24 * 3600 + 24 * 3600);
        let (pruned, changed) = renew(Some(fresh.clone()), &hosts, after).expect("renew");
        assert!(changed && pruned.previous_ca_pem.is_none());
        assert_eq!(pruned.ca_pem, fresh.ca_pem);
        assert_eq!(pruned.ca_bundle(), fresh.ca_pem);
    }

    #[test]
    fn secrets_round_trip() {
        let c = generate(&["127.0.0.1".into(), "localhost".into()], SystemTime::now())
            .expect("generate");
        let s = to_secret("n", "ns", &c, None);
        assert_eq!(from_secret(&s), Some(c));
    }
}
