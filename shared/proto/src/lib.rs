//! Rust types generated from the contracts in `proto/`. Services use the generated servers
//! and clients from here; they never import each other's crates.

/// Encoded `FileDescriptorSet` of every contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

pub mod common {
    pub mod v1 {
        tonic::include_proto!("healthcode.common.v1");
    }
}

pub mod identity {
    pub mod v1 {
        tonic::include_proto!("healthcode.identity.v1");
    }
}

pub mod risk {
    pub mod v1 {
        tonic::include_proto!("healthcode.risk.v1");
    }
}

pub mod testing {
    pub mod v1 {
        tonic::include_proto!("healthcode.testing.v1");
    }
}

pub mod vaccination {
    pub mod v1 {
        tonic::include_proto!("healthcode.vaccination.v1");
    }
}

pub mod exchange {
    pub mod v1 {
        tonic::include_proto!("healthcode.exchange.v1");
    }
}

pub mod gateway {
    pub mod v1 {
        tonic::include_proto!("healthcode.gateway.v1");
    }
}

/// Not a service of the mesh: the echo contract `hc-bench` serves itself to measure the bare
/// cost of the gRPC stack.
pub mod bench {
    pub mod v1 {
        tonic::include_proto!("healthcode.bench.v1");
    }
}
