//! WebSocket close codes sent by a node. `docs/protocol.md` has the same table for clients.
//!
//! | code | meaning | what a client should do |
//! |------|---------|-------------------------|
//! | 1000 | normal closure | nothing |
//! | 1001 | going away: the node is draining | reconnect at once (with jitter), to any node |
//! | 1002 | protocol error: a frame broke RFC 6455 (unmasked, reserved bits or opcode, bad fragmentation, oversized control frame) | fix the client |
//! | 1007 | invalid payload: a text message that is not UTF-8 | fix the client |
//! | 1008 | policy violation (reserved; refusals happen at the handshake with HTTP 401/403) | fix the client |
//! | 1009 | message too big | fix the client |
//! | 1011 | internal error | reconnect with backoff |
//! | 4001 | token expired | reconnect with a new token |
//! | 4003 | disconnected by the server API | do not reconnect with the same token |
//! | 4008 | slow consumer: the outbound queue overflowed | reconnect after a backoff |
//! | 4009 | heartbeat timeout: no frame from the client in time | reconnect with backoff |

pub const NORMAL: u16 = 1000;
pub const GOING_AWAY: u16 = 1001;
pub const PROTOCOL_ERROR: u16 = 1002;
pub const INVALID_PAYLOAD: u16 = 1007;
pub const POLICY: u16 = 1008;
pub const TOO_BIG: u16 = 1009;
pub const INTERNAL: u16 = 1011;
pub const TOKEN_EXPIRED: u16 = 4001;
pub const DISCONNECTED: u16 = 4003;
pub const SLOW_CONSUMER: u16 = 4008;
pub const HEARTBEAT_TIMEOUT: u16 = 4009;

/// The close reason text sent with `code` (short: a close frame carries at most 123 bytes).
pub fn reason(code: u16) -> &'static str {
    match code {
        NORMAL => "normal closure",
        GOING_AWAY => "node draining, reconnect elsewhere",
        PROTOCOL_ERROR => "protocol error",
        INVALID_PAYLOAD => "invalid UTF-8 in a text message",
        POLICY => "policy violation",
        TOO_BIG => "message too big",
        INTERNAL => "internal error",
        TOKEN_EXPIRED => "token expired",
        DISCONNECTED => "disconnected by server",
        SLOW_CONSUMER => "slow consumer",
        HEARTBEAT_TIMEOUT => "heartbeat timeout",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_code_has_a_short_reason() {
        use super::*;
        for code in [
            NORMAL,
            GOING_AWAY,
            PROTOCOL_ERROR,
            INVALID_PAYLOAD,
            POLICY,
            TOO_BIG,
            INTERNAL,
            TOKEN_EXPIRED,
            DISCONNECTED,
            SLOW_CONSUMER,
            HEARTBEAT_TIMEOUT,
        ] {
            let text = reason(code);
            assert!(!text.is_empty() && text.len() <= 123, "{code}");
        }
    }
}
