//! What instances tell each other on the fleet's channel: an entry was
//! replaced (read it again from the shared level), or a purge (apply it to
//! memory too). Redis pub/sub delivers at most once: an instance that was
//! disconnected misses what was sent meanwhile, and its copies are then
//! corrected by their own ttl (a refresh reads the shared level before the
//! backend), not by the event.
//!
//! On the wire: `R\n<owner>\n<key>` and `P\n<owner>\n<K|P|A><0|1>\n<arg>`
//! (key, prefix or all; hard or soft).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Fleet;

/// Events received and not yet applied; past this, new ones are dropped.
pub const EVENT_QUEUE: usize = 4096;

/// The largest event read: a key, or a purge's prefix, is far shorter (a
/// request line is at most 1 MiB, an admin request's body 64 KiB). With
/// [`EVENT_QUEUE`], what the queue can hold is bounded in bytes too.
pub const MAX_EVENT: usize = 64 << 10;

/// What a purge covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Key(String),
    Prefix(String),
    All,
}

/// One message on the fleet's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The shared entry under this key text was replaced.
    Replaced(String),
    /// A purge made on one instance.
    Purged { scope: Scope, soft: bool },
}

impl Event {
    /// The event's kind, as its metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Replaced(_) => "replaced",
            Event::Purged { .. } => "purged",
        }
    }

    /// The message sent for this event by `owner`.
    pub fn to_wire(&self, owner: &str) -> Vec<u8> {
        match self {
            Event::Replaced(key) => format!("R\n{owner}\n{key}").into_bytes(),
            Event::Purged { scope, soft } => {
                let soft = u8::from(*soft);
                let (tag, arg) = match scope {
                    Scope::Key(key) => ('K', key.as_str()),
                    Scope::Prefix(prefix) => ('P', prefix.as_str()),
                    Scope::All => ('A', ""),
                };
                format!("P\n{owner}\n{tag}{soft}\n{arg}").into_bytes()
            }
        }
    }

    /// Reads a message: its sender and the event; `None` for anything
    /// this version did not send.
    pub fn from_wire(message: &[u8]) -> Option<(&str, Event)> {
        let text = std::str::from_utf8(message).ok()?;
        let (kind, rest) = text.split_once('\n')?;
        let (owner, rest) = rest.split_once('\n')?;
        let event = match kind {
            "R" => Event::Replaced(rest.to_string()),
            "P" => {
                let (how, arg) = rest.split_once('\n')?;
                let soft = match how.get(1..)? {
                    "0" => false,
                    "1" => true,
                    _ => return None,
                };
                let scope = match how.get(..1)? {
                    "K" => Scope::Key(arg.to_string()),
                    "P" => Scope::Prefix(arg.to_string()),
                    "A" => Scope::All,
                    _ => return None,
                };
                Event::Purged { scope, soft }
            }
            _ => return None,
        };
        Some((owner, event))
    }
}

/// Listens on the fleet's channel until `cancel`, reconnecting (after
/// 250 ms, doubling to 5 s) whenever the subscription breaks, and hands
/// the other instances' events to `events`. A full queue drops the event,
/// counted.
pub async fn listen(fleet: Arc<Fleet>, events: mpsc::Sender<Event>, cancel: CancellationToken) {
    let mut pause = Duration::from_millis(250);
    loop {
        let connect = tokio::time::timeout(Duration::from_secs(5), fleet.subscribe());
        let subscription = tokio::select! {
            connected = connect => connected,
            () = cancel.cancelled() => return,
        };
        match subscription {
            Ok(Ok(mut pubsub)) => {
                pause = Duration::from_millis(250);
                tracing::debug!("subscribed to the fleet's events");
                let mut messages = pubsub.on_message();
                loop {
                    let message = tokio::select! {
                        message = messages.next() => message,
                        () = cancel.cancelled() => return,
                    };
                    let Some(message) = message else { break };
                    let payload = message.get_payload_bytes();
                    if payload.len() > MAX_EVENT {
                        fleet.count_event("too-large", "received");
                        continue;
                    }
                    let Some((owner, event)) = Event::from_wire(payload) else {
                        continue;
                    };
                    if owner == fleet.owner() {
                        continue;
                    }
                    fleet.count_event(event.kind(), "received");
                    if events.try_send(event).is_err() {
                        fleet.count_event("dropped", "received");
                    }
                }
                tracing::debug!("the fleet's events subscription ended; reconnecting");
            }
            Ok(Err(err)) => tracing::debug!(error = %err, "cannot subscribe to the fleet's events"),
            Err(_) => tracing::debug!("subscribing to the fleet's events timed out"),
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = cancel.cancelled() => return,
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_strangers_are_ignored() {
        let events = [
            Event::Replaced("example.com/a?b=1".into()),
            Event::Purged {
                scope: Scope::Key("h/k".into()),
                soft: true,
            },
            Event::Purged {
                scope: Scope::Prefix("h/feeds/".into()),
                soft: false,
            },
            Event::Purged {
                scope: Scope::All,
                soft: false,
            },
        ];
        for event in events {
            let wire = event.to_wire("host:1:ab");
            assert_eq!(Event::from_wire(&wire), Some(("host:1:ab", event)));
        }
        for stranger in [
            &b""[..],
            b"hello",
            b"X\no\nk",
            b"P\no\nZ0\nk",
            b"P\no\nK7\nk",
            b"\xff\n",
        ] {
            assert_eq!(Event::from_wire(stranger), None);
        }
    }
}
