//! Edge relay: delivery into private networks through an agent the customer runs. Devices
//! are tenant objects with their own tokens (`devices`); the agent holds one outbound
//! WebSocket to Herald (`protocol`), which pushes deliveries down it within the agent's
//! window and settles each on the agent's report (`hub`); `herald edge` is the agent
//! (`agent`).

pub mod agent;
pub mod devices;
pub mod hub;
pub mod protocol;
