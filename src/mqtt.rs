//! MQTT connection plumbing shared by every client of ours (the publisher, the Mosquitto admin client):
//! options from `[mqtt]`, and TLS with the configured CA or the system's roots. Decides nothing about what is
//! published or when.

use std::path::PathBuf;

use rumqttc::v5::MqttOptions;

use crate::config::{BrokerAddress, MqttConfig};
use crate::tls::{Roots, TlsError, Verify};

/// Why client options could not be built; never worth retrying without a configuration change.
#[derive(Debug, thiserror::Error)]
pub enum MqttSetupError {
    #[error("mqtt.url: {0}")]
    Address(String),
    #[error("mqtt.ca_file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("TLS set-up failed: {0}")]
    Tls(String),
}

/// Builds MQTT options for any client of ours (the bridge's publisher, the load harness, tests).
pub fn mqtt_options(
    cfg: &MqttConfig,
    client_id: &str,
    username: Option<&str>,
    password: Option<&str>,
) -> Result<MqttOptions, MqttSetupError> {
    let addr = BrokerAddress::parse(&cfg.url).map_err(MqttSetupError::Address)?;
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

fn tls_config(cfg: &MqttConfig) -> Result<rustls::ClientConfig, MqttSetupError> {
    // Chain and host name, against mqtt.ca_file or the system's roots: the broker is who the URL names.
    crate::tls::client_config(&Roots::from_option(cfg.ca_file.as_deref()), Verify::Full).map_err(|e| match e {
        TlsError::CaFile { path, reason } => MqttSetupError::CaFile { path, reason },
        other => MqttSetupError::Tls(other.to_string()),
    })
}
