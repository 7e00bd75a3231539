//! A Mosquitto that authenticates through dynamic security only, beside PostgreSQL, with the bridge's own
//! publishing account (`bridge`, may publish under `dev/#` and nothing else): the set-up shared by the tests
//! of provisioning, of the pause on refusals and of the API document.

use delta_harness::servers::Mosquitto;

use super::Env;

pub const DYNSEC_ADMIN: &str = "admin";
pub const DYNSEC_ADMIN_PASSWORD: &str = "dynsec-admin-secret";
pub const BRIDGE_PASSWORD: &str = "bridge-publisher-secret";

/// The stack, Mosquitto started with `broker_extra` appended to its configuration, and the bridge's account.
pub fn env(tag: &str, broker_extra: &'static str) -> Env {
    let env = Env::start_with_mqtt(tag, move |dir| {
        Mosquitto::start_dynsec(dir, DYNSEC_ADMIN, DYNSEC_ADMIN_PASSWORD, broker_extra)
            .expect("mosquitto with dynamic security")
    });
    for args in [
        vec!["createClient", "bridge", "-p", BRIDGE_PASSWORD],
        vec!["createRole", "bridge-publisher"],
        vec!["addRoleACL", "bridge-publisher", "publishClientSend", "dev/#", "allow"],
        vec!["addClientRole", "bridge", "bridge-publisher"],
    ] {
        ctrl(&env, &args);
    }
    env
}

/// One `mosquitto_ctrl dynsec` command as the dynamic-security admin.
pub fn ctrl(env: &Env, args: &[&str]) {
    env.mqtt
        .dynsec(DYNSEC_ADMIN, DYNSEC_ADMIN_PASSWORD, args)
        .expect("mosquitto_ctrl");
}
