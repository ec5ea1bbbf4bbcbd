//! The AMQP 0.9.1 transport: publishes a delivery to the subscriber's exchange with a routing
//! key per event type. One connection and one confirm-mode channel per broker URI and
//! exchange (so one subscription's missing exchange, which makes the broker close the
//! channel, cannot fail another's publishes), re-opened on the next publish after any failure
//! (so delivery resumes by itself when a broker comes back). Every publish is mandatory and
//! persistent and waits for its own confirm; many are in flight at once, up to a window of
//! unconfirmed messages per channel.

use super::guard::NetworkGuard;
use super::Outcome;
use crate::model::{AmqpTarget, Delivery};
use crate::payload::Body;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Unconfirmed publishes per channel at most.
const CONFIRM_WINDOW: usize = 1024;

struct Link {
    _conn: Connection,
    channel: Channel,
}

#[derive(Default)]
struct Broker {
    link: tokio::sync::Mutex<Option<Link>>,
    window: Option<Arc<Semaphore>>,
}

/// Publishers pooled per broker URI and exchange.
#[derive(Clone)]
pub struct AmqpTransport {
    brokers: Arc<Mutex<HashMap<String, Arc<Broker>>>>,
    guard: NetworkGuard,
}

/// Checks an AMQP target as a subscription is created: the field of a bad value and why.
pub fn validate(target: &AmqpTarget) -> Result<(), (&'static str, String)> {
    let uri = url::Url::parse(target.uri.expose()).map_err(|e| ("amqp.uri", format!("not a URI: {e}")))?;
    if !matches!(uri.scheme(), "amqp" | "amqps") {
        return Err(("amqp.uri", "must be an amqp:// or amqps:// URI".into()));
    }
    if uri.host_str().is_none_or(str::is_empty) {
        return Err(("amqp.uri", "must have a host".into()));
    }
    if target.uri.expose().parse::<lapin::uri::AMQPUri>().is_err() {
        return Err(("amqp.uri", "not a valid AMQP URI".into()));
    }
    if target.exchange.trim().is_empty() || target.exchange.len() > 255 {
        return Err(("amqp.exchange", "name the exchange to publish to (1 to 255 characters)".into()));
    }
    if target.routing_keys.values().any(|k| k.len() > 255) {
        return Err(("amqp.routing_keys", "routing keys are at most 255 characters".into()));
    }
    Ok(())
}

impl AmqpTransport {
    /// Publishers whose broker hosts pass `guard`.
    pub fn new(guard: NetworkGuard) -> Self {
        AmqpTransport { brokers: Default::default(), guard }
    }

    fn broker(&self, uri: &str, exchange: &str) -> Arc<Broker> {
        let mut brokers = self.brokers.lock().unwrap();
        brokers
            .entry(format!("{uri}\n{exchange}"))
            .or_insert_with(|| {
                Arc::new(Broker { link: Default::default(), window: Some(Arc::new(Semaphore::new(CONFIRM_WINDOW))) })
            })
            .clone()
    }

    /// The URI to connect with: the broker's host must pass the network guard like a
    /// webhook's. For `amqp://` the checked address itself is connected to, so a name cannot
    /// resolve differently the second time; `amqps://` keeps the name, which its certificate
    /// is verified against.
    async fn pinned(&self, uri: &str) -> Result<String, String> {
        let mut parsed = url::Url::parse(uri).map_err(|e| e.to_string())?;
        let host = parsed.host_str().unwrap_or_default().to_string();
        let port = parsed.port().unwrap_or(if parsed.scheme() == "amqps" { 5671 } else { 5672 });
        if let Some(ip) = NetworkGuard::literal(&host) {
            self.guard.check(ip).map_err(|e| e.to_string())?;
            return Ok(uri.to_string());
        }
        let addrs = self.guard.resolve(&host, port).await.map_err(|e| e.to_string())?;
        let first = addrs.first().ok_or_else(|| format!("{host} resolves to no address"))?;
        if parsed.scheme() == "amqp" {
            parsed.set_ip_host(first.ip()).map_err(|_| "cannot pin the broker address".to_string())?;
            return Ok(parsed.to_string());
        }
        Ok(uri.to_string())
    }

    /// The broker's confirm-mode channel, opened now if there is none or it closed.
    async fn channel(&self, broker: &Broker, uri: &str, timeout: Duration) -> Result<Channel, String> {
        let mut link = broker.link.lock().await;
        if let Some(l) = link.as_ref() {
            if l.channel.status().connected() {
                return Ok(l.channel.clone());
            }
        }
        *link = None;
        let pinned = self.pinned(uri).await?;
        let open = async {
            let conn = Connection::connect(&pinned, ConnectionProperties::default())
                .await
                .map_err(|e| format!("connecting to the broker: {e}"))?;
            let channel = conn.create_channel().await.map_err(|e| format!("opening a channel: {e}"))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| format!("enabling confirms: {e}"))?;
            Ok::<_, String>(Link { _conn: conn, channel })
        };
        let opened = tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| "timed out connecting to the broker".to_string())??;
        let channel = opened.channel.clone();
        *link = Some(opened);
        Ok(channel)
    }

    async fn forget(&self, broker: &Broker) {
        *broker.link.lock().await = None;
    }

    /// Publishes `body` for `delivery` and waits for the broker's confirm.
    pub async fn publish(
        &self,
        target: &AmqpTarget,
        delivery: &Delivery,
        body: Body,
        signature: Vec<(String, String)>,
        timeout: Duration,
    ) -> Outcome {
        let started = Instant::now();
        let failed =
            |error: String| Outcome::Failed { status: None, error, retry_after: None, latency: started.elapsed() };
        let uri = target.uri.expose();
        let broker = self.broker(uri, &target.exchange);
        let Some(window) = broker.window.clone() else { return failed("no confirm window".into()) };
        let Ok(_slot) = window.acquire_owned().await else { return failed("broker closed".into()) };
        let channel = match self.channel(&broker, uri, timeout).await {
            Ok(c) => c,
            Err(e) => return failed(e),
        };
        let routing_key =
            target.routing_keys.get(&delivery.event_type).cloned().unwrap_or_else(|| delivery.event_type.clone());
        let mut headers = FieldTable::default();
        for (name, value) in signature {
            headers.insert(ShortString::from(name), AMQPValue::LongString(LongString::from(value)));
        }
        let properties = BasicProperties::default()
            .with_message_id(ShortString::from(delivery.event_id.clone()))
            .with_content_type(ShortString::from("application/json"))
            .with_delivery_mode(2)
            .with_timestamp(crate::model::now_ms().max(0) as u64 / 1000)
            .with_type(ShortString::from(delivery.event_type.clone()))
            .with_headers(headers);
        let payload = body.to_bytes();
        let publish = async {
            let confirm = channel
                .basic_publish(
                    ShortString::from(target.exchange.clone()),
                    ShortString::from(routing_key.clone()),
                    BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                    &payload,
                    properties,
                )
                .await
                .map_err(|e| format!("publishing: {e}"))?;
            confirm.await.map_err(|e| format!("waiting for the confirm: {e}"))
        };
        match tokio::time::timeout(timeout, publish).await {
            Err(_) => {
                self.forget(&broker).await;
                failed("timed out waiting for the broker's confirm".into())
            }
            Ok(Err(e)) => {
                // A closed channel (e.g. the exchange does not exist) or connection: reopen next time.
                self.forget(&broker).await;
                failed(e)
            }
            Ok(Ok(confirmation)) if confirmation.is_nack() => failed("the broker refused the message (nack)".into()),
            Ok(Ok(confirmation)) => match confirmation.take_message() {
                Some(returned) => failed(format!(
                    "unroutable: exchange {:?} has no queue bound for routing key {routing_key:?} ({} {})",
                    target.exchange, returned.reply_code, returned.reply_text
                )),
                None => Outcome::Delivered { status: 200, latency: started.elapsed() },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Secret;

    #[tokio::test]
    async fn plain_amqp_connects_to_the_address_the_guard_checked() {
        let allowed = AmqpTransport::new(NetworkGuard::new(vec!["127.0.0.0/8".parse().unwrap()]));
        let pinned = allowed.pinned("amqp://user:pw@localhost:5672/%2f").await.unwrap();
        assert_eq!(pinned, "amqp://user:pw@127.0.0.1:5672/%2f");
        // TLS keeps the name its certificate is checked against.
        assert_eq!(allowed.pinned("amqps://localhost/vh").await.unwrap(), "amqps://localhost/vh");
        let strict = AmqpTransport::new(NetworkGuard::default());
        assert!(strict.pinned("amqp://localhost/").await.unwrap_err().contains("network.allow"));
        assert!(strict.pinned("amqp://127.0.0.1/").await.unwrap_err().contains("network.allow"));
    }

    #[test]
    fn targets_are_validated_naming_the_field() {
        let target = |uri: &str, exchange: &str| AmqpTarget {
            uri: Secret(uri.into()),
            exchange: exchange.into(),
            routing_keys: Default::default(),
        };
        assert!(validate(&target("amqp://h/vh", "x")).is_ok());
        assert_eq!(validate(&target("http://h", "x")).unwrap_err().0, "amqp.uri");
        assert_eq!(validate(&target("amqp://", "x")).unwrap_err().0, "amqp.uri");
        assert_eq!(validate(&target("amqp://h", " ")).unwrap_err().0, "amqp.exchange");
    }
}
