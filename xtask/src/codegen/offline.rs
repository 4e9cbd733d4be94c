//! An offline stand-in for `CudaRuntime`: a cubecl [`Runtime`] whose server never touches a GPU.
//!
//! The macro-generated `launch`/`launch_unchecked` functions need a `ComputeClient` (they read
//! device properties and submit the kernel to the server). This runtime gives them one with
//! hand-made H100 (sm_90) properties; its server compiles each launched kernel to CUDA C++ with
//! cubecl's own `CudaCompiler` (the exact compiler `CudaRuntime` uses) and records the source
//! instead of running it. Kernel code generic over `R: Runtime` therefore produces, through its
//! normal launch path, the same source it would JIT on the device.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use cubecl::client::ComputeClient;
use cubecl::cuda::{CudaCompiler, CudaDevice, CudaRuntime, CUDA_MAX_BINDINGS};
use cubecl::ir::{
    features::{AtomicUsage, Plane, TypeUsage},
    DeviceProperties, ElemType, FloatKind, HardwareProperties, MemoryDeviceProperties,
    SemanticType, StorageType, TargetProperties, Type, VectorSize,
};
use cubecl::prelude::{CubeCount, ExecutionMode};
use cubecl::server::{
    Binding, ComputeServer, CopyDescriptor, IoError, KernelArguments, ProfileError, ProfilingToken,
    ServerCommunication, ServerError, ServerUtilities,
};
use cubecl::zspace::{Shape, Strides};
use cubecl::CubeTask;
use cubecl::Runtime;
use cubecl_cpp::shared::{CompilationOptions, CppSupportedFeatures};
use cubecl_runtime::allocator::PitchedMemoryLayoutPolicy;
use cubecl_runtime::logging::ServerLogger;
use cubecl_runtime::memory_management::{ManagedMemoryHandle, MemoryAllocationMode, MemoryUsage};
use cubecl_runtime::storage::{ComputeStorage, ManagedResource, StorageHandle, StorageId};

use cubecl::backtrace::BackTrace;
use cubecl::bytes::Bytes;
use cubecl::device::{DeviceId, DeviceService, ServerUtilitiesHandle};
use cubecl::future::DynFut;
use cubecl::profile::{ProfileDuration, TimingMethod};
use cubecl::stream_id::StreamId;

/// One kernel launch seen by the offline server.
#[derive(Debug, Clone)]
pub struct CapturedKernel {
    /// Entry point name in the generated source (carries the dtype suffixes).
    pub entrypoint: String,
    /// The kernel's id (type, cube dim, comptime info): distinguishes comptime variants.
    pub id: String,
    /// Cube dim of the launch, `(x, y, z)`.
    pub cube_dim: (u32, u32, u32),
    /// Whether it was launched checked (bounds checks in the source) or unchecked.
    pub mode: &'static str,
    /// CUDA C++ source, or the compile error / panic message.
    pub source: Result<String, String>,
}

static CAPTURED: Mutex<Vec<CapturedKernel>> = Mutex::new(Vec::new());

/// Takes every kernel captured since the last call (in launch order).
pub fn drain_captured() -> Vec<CapturedKernel> {
    std::mem::take(&mut *CAPTURED.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The offline runtime. Use `OfflineCuda::client(&Default::default())`.
#[derive(Debug, Clone)]
pub struct OfflineCuda;

/// The server behind [`OfflineCuda`]: compiles instead of running.
#[derive(Debug)]
pub struct OfflineServer {
    utilities: Arc<ServerUtilities<Self>>,
}

/// Storage that holds nothing: memory handles are created on the client side and never read.
#[derive(Debug)]
pub struct NoStorage;

impl ComputeStorage for NoStorage {
    type Resource = ();

    fn alignment(&self) -> usize {
        512
    }

    fn get(&mut self, _handle: &StorageHandle) -> Self::Resource {}

    fn alloc(&mut self, _size: u64) -> Result<StorageHandle, IoError> {
        Err(IoError::UnsupportedIoOperation {
            backtrace: BackTrace::capture(),
        })
    }

    fn dealloc(&mut self, _id: StorageId) {}

    fn flush(&mut self) {}
}

/// Compilation options `CudaRuntime` uses on an sm_90 device (see cubecl-cuda's `runtime.rs`).
pub fn compilation_options() -> CompilationOptions {
    CompilationOptions {
        warp_size: 32,
        supports_features: CppSupportedFeatures {
            fast_math: true,
            grid_constants: true,
            clusters: true,
            elect_sync: true,
            fast_tanh: cudarc::driver::sys::CUDA_VERSION >= 12080,
        },
    }
}

/// H100 SXM device properties as `CudaRuntime` would register them for sm_90.
///
/// Mirrors cubecl-cuda 0.10's `DeviceService::init` for `arch_version = 90`, with the queried
/// attributes replaced by the H100's values; matrix (wmma/mma) features are left out because no
/// fp8kv kernel uses them.
pub fn h100_properties() -> DeviceProperties {
    let hardware = HardwareProperties {
        load_width: 128,
        plane_size_min: 32,
        plane_size_max: 32,
        max_bindings: CUDA_MAX_BINDINGS,
        max_shared_memory_size: 232_448,
        max_cube_count: (i32::MAX as u32, u16::MAX as u32, u16::MAX as u32),
        max_units_per_cube: 1024,
        max_cube_dim: (1024, 1024, 64),
        num_streaming_multiprocessors: Some(132),
        num_tensor_cores: Some(4),
        min_tensor_cores_dim: Some(8),
        num_cpu_cores: None,
        max_vector_size: VectorSize::MAX,
    };
    let memory = MemoryDeviceProperties {
        max_page_size: 80 * 1024 * 1024 * 1024 / 4,
        alignment: 512,
    };
    let mut props =
        DeviceProperties::new(Default::default(), memory, hardware, TimingMethod::System);
    cubecl_cpp::register_supported_types(&mut props);
    props.register_type_usage(ElemType::Float(FloatKind::TF32), TypeUsage::Conversion);
    for (kind, vector) in [
        (FloatKind::F64, 1),
        (FloatKind::F16, 1),
        (FloatKind::F16, 2),
        (FloatKind::F32, 2),
        (FloatKind::F32, 4),
    ] {
        props.register_atomic_type_usage(
            Type::new(StorageType::Atomic(ElemType::Float(kind))).with_vector_size(vector),
            AtomicUsage::Add | AtomicUsage::LoadStore,
        );
    }
    props.register_semantic_type(SemanticType::Pipeline);
    props.features.plane.insert(Plane::Sync);
    props.features.copy_async = true;
    // sm_89+: FP8 is a storage and conversion type.
    for kind in [FloatKind::E4M3, FloatKind::E5M2] {
        props.register_type_usage(
            ElemType::Float(kind),
            TypeUsage::Conversion | TypeUsage::Buffer,
        );
    }
    props.features.cube_cluster = true;
    props.features.memory_reinterpret = true;
    props.features.alignment = true;
    props.features.plane.insert(Plane::Ops);
    props.features.plane.insert(Plane::NonUniformControlFlow);
    props
}

impl DeviceService for OfflineServer {
    fn init(_device_id: DeviceId) -> Self {
        let props = h100_properties();
        let policy = PitchedMemoryLayoutPolicy::new(props.memory.alignment as usize);
        let utilities = ServerUtilities::new(props, Arc::new(ServerLogger::default()), (), policy);
        Self {
            utilities: Arc::new(utilities),
        }
    }

    fn utilities(&self) -> ServerUtilitiesHandle {
        self.utilities.clone() as ServerUtilitiesHandle
    }
}

impl ServerCommunication for OfflineServer {
    const SERVER_COMM_ENABLED: bool = false;
}

fn unsupported(what: &str) -> ServerError {
    ServerError::Generic {
        reason: format!("the offline codegen runtime cannot {what}"),
        backtrace: BackTrace::capture(),
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "non-string panic".into())
}

impl ComputeServer for OfflineServer {
    type Kernel = Box<dyn CubeTask<CudaCompiler>>;
    type Info = ();
    type MemoryLayoutPolicy = PitchedMemoryLayoutPolicy;
    type Storage = NoStorage;

    fn initialize_memory(&mut self, _memory: ManagedMemoryHandle, _size: u64, _stream: StreamId) {}

    fn logger(&self) -> Arc<ServerLogger> {
        self.utilities.logger.clone()
    }

    fn utilities(&self) -> Arc<ServerUtilities<Self>> {
        self.utilities.clone()
    }

    fn read(
        &mut self,
        _descriptors: Vec<CopyDescriptor>,
        _stream_id: StreamId,
    ) -> DynFut<Result<Vec<Bytes>, ServerError>> {
        let err = unsupported("read device memory");
        Box::pin(async move { Err(err) })
    }

    // Writes (uploads of kernel inputs) are accepted and dropped: only the source matters.
    fn write(&mut self, _descriptors: Vec<(CopyDescriptor, Bytes)>, _stream_id: StreamId) {}

    fn sync(&mut self, _stream_id: StreamId) -> DynFut<Result<(), ServerError>> {
        Box::pin(async { Ok(()) })
    }

    fn get_resource(
        &mut self,
        _binding: Binding,
        _stream_id: StreamId,
    ) -> Result<ManagedResource<()>, ServerError> {
        Err(unsupported("hand out device resources"))
    }

    // `unsafe` because the trait's `launch` is (a real server runs unchecked kernels). This one
    // only compiles the kernel and records its source: nothing is run and no buffer is touched,
    // so it has no safety requirement of its own.
    unsafe fn launch(
        &mut self,
        kernel: Self::Kernel,
        _count: CubeCount,
        _bindings: KernelArguments,
        mode: ExecutionMode,
        _stream_id: StreamId,
    ) {
        let id = kernel.id();
        let cube_dim = (id.cube_dim.x, id.cube_dim.y, id.cube_dim.z);
        // A panic in cubecl's compiler must become a FAIL row, not kill the server thread.
        let compiled = std::panic::catch_unwind(AssertUnwindSafe(|| {
            kernel.compile(
                &mut Default::default(),
                &compilation_options(),
                mode,
                kernel.address_type(),
            )
        }));
        let (entrypoint, source) = match compiled {
            Ok(Ok(c)) => (c.entrypoint_name, Ok(c.source)),
            Ok(Err(e)) => (kernel.name().to_string(), Err(format!("{e}"))),
            Err(p) => (kernel.name().to_string(), Err(panic_message(p))),
        };
        let mode = match mode {
            ExecutionMode::Checked => "checked",
            ExecutionMode::Unchecked => "unchecked",
            _ => "validate",
        };
        CAPTURED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(CapturedKernel {
                entrypoint,
                id: format!("{id}"),
                cube_dim,
                mode,
                source,
            });
    }

    fn flush(&mut self, _stream_id: StreamId) -> Result<(), ServerError> {
        Ok(())
    }

    fn memory_usage(&mut self, _stream_id: StreamId) -> Result<MemoryUsage, ServerError> {
        Err(unsupported("report memory usage"))
    }

    fn memory_cleanup(&mut self, _stream_id: StreamId) {}

    fn start_profile(&mut self, _stream_id: StreamId) -> Result<ProfilingToken, ServerError> {
        Err(unsupported("profile"))
    }

    fn end_profile(
        &mut self,
        _stream_id: StreamId,
        _token: ProfilingToken,
    ) -> Result<ProfileDuration, ProfileError> {
        Err(ProfileError::Unknown {
            reason: "the offline codegen runtime cannot profile".into(),
            backtrace: BackTrace::capture(),
        })
    }

    fn allocation_mode(&mut self, _mode: MemoryAllocationMode, _stream_id: StreamId) {}
}

impl Runtime for OfflineCuda {
    type Compiler = CudaCompiler;
    type Server = OfflineServer;
    type Device = CudaDevice;

    fn client(device: &Self::Device) -> ComputeClient<Self> {
        ComputeClient::load(device)
    }

    fn name(_client: &ComputeClient<Self>) -> &'static str {
        "cuda"
    }

    // Same answers as CudaRuntime, so kernels see the same launch-time metadata.
    fn require_array_lengths() -> bool {
        CudaRuntime::require_array_lengths()
    }

    fn max_cube_count() -> (u32, u32, u32) {
        CudaRuntime::max_cube_count()
    }

    fn can_read_tensor(shape: &Shape, strides: &Strides) -> bool {
        CudaRuntime::can_read_tensor(shape, strides)
    }

    fn target_properties() -> TargetProperties {
        CudaRuntime::target_properties()
    }

    fn enumerate_devices(_type_id: u16, _info: &()) -> Vec<DeviceId> {
        vec![DeviceId {
            type_id: 0,
            index_id: 0,
        }]
    }
}
