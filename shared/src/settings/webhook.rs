//! The webhook rules: notify-worker's `notify.webhook` and snapshot-worker's frame deliveries
//! both send signed JSON POSTs under them, so the group lives here rather than in either
//! worker. Its names start with `webhook_`, which [`super::OWNERS`] gives to notify-worker;
//! snapshot-worker loads the group too.

use std::time::Duration;

use super::kinds::*;

crate::settings_group! {
    /// Outbound webhook settings (notify-worker and snapshot-worker).
    pub struct WebhookSettings {
        owner = "notify-worker";
        prefixes = ["webhook_"];
        /// HMAC-SHA256 key signing webhook bodies; best given as `MEDIAFARM_WEBHOOK_SECRET`.
        webhook_secret: Option<String> = None, Str;
        /// Hosts webhooks may go to (exact or `*.example.com`); empty: any public host.
        webhook_allowed_hosts: Vec<String> = Vec::new(), List;
        /// Let webhooks reach loopback, private, link-local or other internal addresses.
        webhook_allow_private: bool = false, Bool;
        /// Accept plain `http://` webhook URLs (`https://` only when false).
        webhook_allow_http: bool = false, Bool;
        /// Whole-request time limit of a webhook or HTTP SMS provider call.
        webhook_timeout: Duration = Duration::from_secs(10), SecondsOrDefault;
        /// Cluster-wide cap on webhook calls, e.g. `"20/s"`; unset: none.
        webhook_rate_limit: Option<super::RateLimit> = None, Rate;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_has_an_owned_prefix() {
        crate::settings::sources::assert_prefixes_owned::<WebhookSettings>();
    }
}
