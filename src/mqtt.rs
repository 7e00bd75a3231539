//! MQTT connection plumbing shared by every client of ours (the publisher, the Mosquitto admin client):
//! options from `[mqtt]`, and TLS with the configured CA or the system's roots. Decides nothing about what is
//! published or when.

use std::sync::Arc;

use rumqttc::v5::MqttOptions;

use crate::config::{BrokerAddress, MqttConfig};

/// Builds MQTT options for any client of ours (the bridge's publisher, the load harness, tests).
pub fn mqtt_options(
    cfg: &MqttConfig,
    client_id: &str,
    username: Option<&str>,
    password: Option<&str>,
) -> Result<MqttOptions, String> {
    let addr = BrokerAddress::parse(&cfg.url)?;
    let mut opts = MqttOptions::new(client_id, addr.host.clone(), addr.port);
    opts.set_keep_alive(cfg.keep_alive);
    opts.set_clean_start(true);
    opts.set_connection_timeout(10);
    opts.set_max_packet_size(Some(256 * 1024 * 1024));
    if let Some(u) = username {
        opts.set_credentials(u, password.unwrap_or(""));
    }
    if addr.tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(tls_config(cfg)?.into()));
    }
    Ok(opts)
}

fn tls_config(cfg: &MqttConfig) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("mqtt.ca_file {}: {e}", path.display()))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| format!("mqtt.ca_file {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("mqtt.ca_file {}: {e}", path.display()))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
