//! [`Graph`]: a recorded sequence of launches on candle's CUDA stream, replayed with one call.
//!
//! At batch 1 a decoder step is hundreds of small kernels and candle dispatches each one from
//! the host (allocation, argument marshalling, launch): on the 2B-4T shapes that host work, not
//! the GPU, set the decode speed. Recording the step once and replaying it removes the host
//! work. A recording replays the same pointers and launch shapes, so whatever changes between
//! steps must live in device memory that the caller updates before [`Graph::launch`] (see
//! [`super::attention`] for the position), and buffers the recording wrote must stay alive.

use std::sync::Mutex;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, Result};

/// A recorded CUDA graph (see the module docs).
pub struct Graph {
    // CUDA graph objects are not internally synchronized: the mutex serializes launches.
    exec: Mutex<SendGraph>,
}

struct SendGraph(CudaGraph);

// SAFETY: a CUDA graph may be used from any thread as long as calls on it are serialized, which
// the mutex in `Graph` guarantees (cudarc leaves `CudaGraph` !Send only for that reason).
unsafe impl Send for SendGraph {}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Graph")
    }
}

impl Graph {
    /// Records the launches `record` issues on `dev`'s stream (nothing runs while recording).
    ///
    /// Everything `record` needs must already be initialized (kernels loaded, weights uploaded:
    /// run the same work once before), and it must not copy to or from the host or
    /// synchronize; if it does, the error is returned and the stream is left usable.
    /// Buffers allocated while recording are freed by the next launch (auto-free-on-launch),
    /// so outputs must be copied into tensors that outlive the recording.
    pub fn capture(dev: &CudaDevice, record: impl FnOnce() -> Result<()>) -> Result<Self> {
        let stream = dev.cuda_stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .w()?;
        let recorded = record();
        // End the capture whatever happened, so that the stream is usable again.
        let graph = stream.end_capture(
            sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
        );
        recorded?;
        match graph.w()? {
            Some(g) => Ok(Self {
                exec: Mutex::new(SendGraph(g)),
            }),
            None => candle_core::bail!("CUDA graph capture recorded nothing"),
        }
    }

    /// Replays the recording on the stream it was recorded on (asynchronously).
    pub fn launch(&self) -> Result<()> {
        let g = self
            .exec
            .lock()
            .map_err(|_| candle_core::Error::Msg("CUDA graph mutex poisoned".into()))?;
        g.0.launch().w()
    }
}
