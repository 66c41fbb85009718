//! Where layers go, decided before loading: how many of the `n_layer + 1` offloadable layers
//! (the output layer counts as one) leave the CPU, and in which proportions the devices that
//! take them share them.
//!
//! The shares a user gives (`--tensor-split`) list the local devices first, then the remote
//! ones in the order the workers were given: the local GPUs, or on a machine without a GPU the
//! CPU itself. llama.cpp's own split only covers devices that are not the CPU, so a CPU share
//! becomes the number of layers kept on the CPU (llama.cpp keeps the first layers there).

use super::GpuLayers;

/// A device that can take layers.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    /// ggml's device index (`None` for the local CPU).
    pub index: Option<usize>,
    /// Its name, for messages.
    pub name: String,
    /// Free memory in bytes (the default shares when workers are used).
    pub free: u64,
}

/// The decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// ggml indices of the devices that take layers, in llama.cpp's order.
    pub devices: Vec<usize>,
    /// Their names.
    pub names: Vec<String>,
    /// Each device's share of the offloaded layers (summing to 1), parallel to `devices`;
    /// empty = llama.cpp's default (in proportion to free memory).
    pub split: Vec<f32>,
    /// Layers offloaded; `None` = llama.cpp's fitting decides from free GPU memory.
    pub gpu_layers: Option<u32>,
}

/// Why no placement could be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementError {
    /// More shares than devices.
    #[error("{given} shares given for {} device(s) ({})", devices.len(), devices.join(", "))]
    TooManyShares {
        /// Shares given.
        given: usize,
        /// The devices, in the order the shares apply to.
        devices: Vec<String>,
    },
    /// Shares that are negative, not finite, or all zero.
    #[error("shares must be non-negative with a positive sum, got {0:?}")]
    BadShares(Vec<f32>),
}

/// Decides the placement.
///
/// `local` holds the local GPUs, or just the CPU (`index: None`) on a machine without one;
/// `remote` the RPC workers' devices in order. `n_layer` is the model's block count.
///
/// # Errors
/// Shares that do not fit the devices.
pub fn place(
    n_layer: u32,
    local: &[Slot],
    remote: &[Slot],
    gpu_layers: GpuLayers,
    shares: Option<&[f32]>,
) -> Result<Placement, PlacementError> {
    let n_off = n_layer + 1;
    let slots: Vec<&Slot> = local.iter().chain(remote).collect();
    let offload: Vec<&Slot> = slots
        .iter()
        .copied()
        .filter(|s| s.index.is_some())
        .collect();
    if offload.is_empty() {
        if let Some(s) = shares {
            check(s, slots.len(), &slots)?;
        }
        return Ok(Placement {
            devices: Vec::new(),
            names: Vec::new(),
            split: Vec::new(),
            gpu_layers: Some(0),
        });
    }
    let shares: Vec<f32> = match shares {
        Some(s) => {
            check(s, slots.len(), &slots)?;
            let mut v = s.to_vec();
            v.resize(slots.len(), 0.0);
            v
        }
        // Local GPUs only: llama.cpp's own fitting and default split know best.
        None if remote.is_empty() => {
            return Ok(Placement {
                devices: offload.iter().filter_map(|s| s.index).collect(),
                names: offload.iter().map(|s| s.name.clone()).collect(),
                split: Vec::new(),
                gpu_layers: match gpu_layers {
                    GpuLayers::Auto => None,
                    GpuLayers::All => Some(n_off),
                    GpuLayers::Count(n) => Some(n.min(n_off)),
                },
            });
        }
        // With workers, every device shares in proportion to its free memory.
        None => slots.iter().map(|s| s.free as f32).collect(),
    };
    let total: f32 = shares.iter().sum();
    let cpu_share: f32 = slots
        .iter()
        .zip(&shares)
        .filter(|(s, _)| s.index.is_none())
        .map(|(_, &x)| x)
        .sum();
    let chosen: Vec<(&Slot, f32)> = slots
        .iter()
        .zip(&shares)
        .filter(|(s, &x)| s.index.is_some() && x > 0.0)
        .map(|(s, &x)| (*s, x))
        .collect();
    let offloaded_share: f32 = chosen.iter().map(|(_, x)| x).sum();
    let gpu = match gpu_layers {
        GpuLayers::Count(n) => n.min(n_off),
        _ if offloaded_share <= 0.0 => 0,
        _ => {
            let cpu_layers = (n_off as f32 * cpu_share / total).round() as u32;
            n_off - cpu_layers.min(n_off)
        }
    };
    Ok(Placement {
        devices: chosen.iter().filter_map(|(s, _)| s.index).collect(),
        names: chosen.iter().map(|(s, _)| s.name.clone()).collect(),
        split: chosen
            .iter()
            .map(|(_, x)| x / offloaded_share.max(f32::MIN_POSITIVE))
            .collect(),
        gpu_layers: Some(if chosen.is_empty() { 0 } else { gpu }),
    })
}

fn check(shares: &[f32], n_slots: usize, slots: &[&Slot]) -> Result<(), PlacementError> {
    if shares.len() > n_slots {
        return Err(PlacementError::TooManyShares {
            given: shares.len(),
            devices: slots.iter().map(|s| s.name.clone()).collect(),
        });
    }
    if shares.iter().any(|x| !x.is_finite() || *x < 0.0) || shares.iter().sum::<f32>() <= 0.0 {
        return Err(PlacementError::BadShares(shares.to_vec()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(i: usize, free_gib: u64) -> Slot {
        Slot {
            index: Some(i),
            name: format!("GPU{i}"),
            free: free_gib << 30,
        }
    }

    fn cpu(free_gib: u64) -> Slot {
        Slot {
            index: None,
            name: "CPU".into(),
            free: free_gib << 30,
        }
    }

    #[test]
    fn local_gpus_alone_leave_the_choice_to_llama_cpp() {
        let p = place(60, &[gpu(1, 24), gpu(2, 24)], &[], GpuLayers::Auto, None).unwrap();
        assert_eq!(p.devices, vec![1, 2]);
        assert!(p.split.is_empty());
        assert_eq!(p.gpu_layers, None);
        let p = place(60, &[gpu(1, 24)], &[], GpuLayers::Count(100), None).unwrap();
        assert_eq!(p.gpu_layers, Some(61));
    }

    #[test]
    fn shares_pass_through_as_proportions() {
        let p = place(
            60,
            &[gpu(1, 24), gpu(2, 24)],
            &[],
            GpuLayers::All,
            Some(&[3.0, 1.0]),
        )
        .unwrap();
        assert_eq!(p.split, vec![0.75, 0.25]);
        assert_eq!(p.gpu_layers, Some(61));
        // A zero share leaves the device out.
        let p = place(
            60,
            &[gpu(1, 24), gpu(2, 24)],
            &[],
            GpuLayers::All,
            Some(&[0.0, 1.0]),
        )
        .unwrap();
        assert_eq!(p.devices, vec![2]);
        assert_eq!(p.split, vec![1.0]);
    }

    #[test]
    fn workers_share_by_free_memory_with_the_cpu_of_a_gpu_less_client() {
        // 16 GiB on the client's CPU, 24 and 8 on two workers: a third... of 48 GiB is the CPU's.
        let p = place(
            59,
            &[cpu(16)],
            &[gpu(3, 24), gpu(4, 8)],
            GpuLayers::Auto,
            None,
        )
        .unwrap();
        assert_eq!(p.devices, vec![3, 4]);
        assert_eq!(p.gpu_layers, Some(40), "60 layers, a third on the CPU");
        assert_eq!(p.split, vec![0.75, 0.25]);
    }

    #[test]
    fn the_cpu_share_comes_first_on_a_gpu_less_client() {
        let p = place(
            2,
            &[cpu(1)],
            &[gpu(1, 1), gpu(2, 1)],
            GpuLayers::Auto,
            Some(&[1.0, 1.0, 1.0]),
        )
        .unwrap();
        assert_eq!(
            p.gpu_layers,
            Some(2),
            "3 offloadable layers, one stays on the CPU"
        );
        assert_eq!(p.split, vec![0.5, 0.5]);
        let p = place(
            2,
            &[cpu(1)],
            &[gpu(1, 1)],
            GpuLayers::Auto,
            Some(&[1.0, 0.0]),
        )
        .unwrap();
        assert_eq!(p.gpu_layers, Some(0));
        assert!(p.devices.is_empty());
    }

    #[test]
    fn bad_shares_are_refused_naming_the_devices() {
        let e = place(2, &[gpu(1, 1)], &[], GpuLayers::Auto, Some(&[1.0, 1.0])).unwrap_err();
        assert_eq!(e.to_string(), "2 shares given for 1 device(s) (GPU1)");
        let e = place(2, &[gpu(1, 1)], &[], GpuLayers::Auto, Some(&[0.0])).unwrap_err();
        assert!(matches!(e, PlacementError::BadShares(_)));
        let e = place(2, &[gpu(1, 1)], &[], GpuLayers::Auto, Some(&[f32::NAN])).unwrap_err();
        assert!(matches!(e, PlacementError::BadShares(_)));
    }

    #[test]
    fn no_device_to_offload_to_keeps_everything_on_the_cpu() {
        let p = place(4, &[cpu(8)], &[], GpuLayers::All, None).unwrap();
        assert_eq!(p.gpu_layers, Some(0));
        assert!(p.devices.is_empty());
    }
}
