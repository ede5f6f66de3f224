//! The busiest channels: each node's own (in its heartbeat), and the cluster's, summed from them.

use std::collections::HashMap;

use pushgate_protocol::envelope::{ChannelCount, NodeStats};
use serde::Serialize;

use super::Node;

/// How many of its busiest channels a node reports in its heartbeat. Bounds the heartbeat's
/// size (at most this many channel names) and the work of `/api/channels`.
pub const TOP_CHANNELS: usize = 20;

/// A channel's subscribers over the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterChannel {
    pub channel: String,
    /// Sum of the subscribers the nodes reported.
    pub subscribers: u64,
    /// How many nodes reported it.
    pub nodes: u64,
}

/// The answer of `/api/channels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChannelsDoc {
    pub channels: Vec<ClusterChannel>,
    /// Some node has more channels than it reports: a channel outside its busiest could be
    /// missing from the list, or counted short. Sums are exact otherwise.
    pub approximate: bool,
}

impl Node {
    /// This node's busiest channels, for its heartbeat.
    pub(super) fn top_channels(&self) -> Vec<ChannelCount> {
        (self.hub.busiest_channels(TOP_CHANNELS).into_iter())
            .map(|(channel, n)| ChannelCount {
                channel: channel.to_string(),
                subscribers: n as u64,
            })
            .collect()
    }

    /// The cluster's `limit` busiest channels: this node's figures now, the others' from their
    /// last heartbeat.
    pub fn cluster_channels(&self, limit: usize) -> ChannelsDoc {
        merge(&self.cluster(), limit)
    }
}

/// Sums the channels the nodes report; the `limit` with most subscribers, most first (ties by
/// name).
pub fn merge(nodes: &[NodeStats], limit: usize) -> ChannelsDoc {
    let mut sums: HashMap<&str, (u64, u64)> = HashMap::new();
    for node in nodes {
        for c in &node.top_channels {
            let sum = sums.entry(&c.channel).or_default();
            sum.0 = sum.0.saturating_add(c.subscribers);
            sum.1 += 1;
        }
    }
    let mut channels: Vec<ClusterChannel> = (sums.into_iter())
        .map(|(channel, (subscribers, nodes))| ClusterChannel {
            channel: channel.to_owned(),
            subscribers,
            nodes,
        })
        .collect();
    channels.sort_unstable_by(|a, b| {
        (b.subscribers.cmp(&a.subscribers)).then_with(|| a.channel.cmp(&b.channel))
    });
    channels.truncate(limit);
    ChannelsDoc {
        channels,
        approximate: nodes
            .iter()
            .any(|n| n.channels > n.top_channels.len() as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, channels: u64, top: &[(&str, u64)]) -> NodeStats {
        NodeStats {
            node: name.into(),
            connections: 0,
            users: 0,
            channels,
            draining: false,
            uptime_secs: 0,
            broker: "redis".into(),
            broker_ready: true,
            url: None,
            deliveries: 0,
            ts: 0,
            top_channels: (top.iter())
                .map(|(c, n)| ChannelCount {
                    channel: (*c).into(),
                    subscribers: *n,
                })
                .collect(),
        }
    }

    fn names(doc: &ChannelsDoc) -> Vec<(&str, u64, u64)> {
        (doc.channels.iter())
            .map(|c| (c.channel.as_str(), c.subscribers, c.nodes))
            .collect()
    }

    #[test]
    fn sums_over_nodes_busiest_first() {
        let nodes = [
            node("n1", 2, &[("a", 5), ("b", 1)]),
            node("n2", 2, &[("b", 3), ("c", 2)]),
            node("n3", 0, &[]),
        ];
        let doc = merge(&nodes, 10);
        assert_eq!(names(&doc), [("a", 5, 1), ("b", 4, 2), ("c", 2, 1)]);
        assert!(!doc.approximate, "every node listed all its channels");
        assert_eq!(names(&merge(&nodes, 2)), [("a", 5, 1), ("b", 4, 2)]);
        assert!(merge(&nodes, 0).channels.is_empty());
    }

    #[test]
    fn ties_go_by_name_and_partial_lists_are_approximate() {
        let nodes = [
            node("n1", 30, &[("y", 2), ("x", 2)]),
            // A node of an older version reports no channels at all.
            node("n0", 0, &[]),
        ];
        let doc = merge(&nodes, 10);
        assert_eq!(names(&doc), [("x", 2, 1), ("y", 2, 1)]);
        assert!(doc.approximate, "n1 has more channels than it listed");
        assert!(merge(&[node("old", 1, &[])], 10).approximate);
    }
}
