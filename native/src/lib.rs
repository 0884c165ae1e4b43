//! ztna's native data plane: QUIC endpoints on quinn-proto, quinn-udp and rustls (ring),
//! driven from Python through PyO3 (`ztna._native`).

pub mod config;
pub mod core;
pub mod meshroute;
pub mod netinfo;
pub mod sockpump;
pub mod splice;
pub mod tls;
pub mod tunpump;
pub mod udpflow;

#[cfg(feature = "python")]
mod py;
#[cfg(feature = "python")]
mod tunpy;
#[cfg(feature = "python")]
mod udpflowpy;

#[cfg(feature = "python")]
use pyo3::prelude::*;

#[cfg(feature = "python")]
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    py::install_panic_hook();
    m.add_class::<py::Endpoint>()?;
    m.add_class::<py::ClientTls>()?;
    m.add_class::<py::ServerTls>()?;
    m.add_class::<tunpy::TunPump>()?;
    m.add_class::<udpflowpy::UdpFlows>()?;
    m.add_function(wrap_pyfunction!(py::check_identity, m)?)?;
    m.add_function(wrap_pyfunction!(py::interface_addresses, m)?)?;
    m.add("PY_WINDOW", core::PY_WINDOW)?;
    m.add("CID_LEN", config::CID_LEN)?;
    m.add("SPLICE_DONE", splice::SPLICE_DONE)?;
    m.add("SPLICE_RESET", splice::SPLICE_RESET)?;
    m.add("SPLICE_FAILED", splice::SPLICE_FAILED)?;
    m.add("SPLICE_GONE", splice::SPLICE_GONE)?;
    Ok(())
}
