//! Which commands a challenge asks. Every device kind has a baseline; on top, each
//! other applicable command is added at random with the configured spot-check share,
//! and a device whose last appraisal was risky gets the full scan. A device therefore
//! cannot tell in advance which checks it will face.

use vouch_proto::attest::{Command, CommandKind};
use vouch_proto::crypto::{SystemRandom, random_bytes};
use vouch_proto::enrol::DeviceKind;

/// From this risk on, the next challenge asks every applicable command.
pub const FULL_SCAN_RISK: i64 = 50;

/// Regions measured when no reference values name any.
fn default_regions(kind: DeviceKind) -> &'static [&'static str] {
    match kind {
        DeviceKind::Terminal => &["boot", "payment_app"],
        DeviceKind::Reader => &["firmware"],
        DeviceKind::Pos | DeviceKind::Consumer => &["app"],
    }
}

fn baseline(kind: DeviceKind) -> &'static [CommandKind] {
    use CommandKind::*;
    match kind {
        DeviceKind::Terminal => &[Measure, TamperSwitch, RootCheck, DebuggerCheck, OsPatchLevel, ReaderFirmware],
        DeviceKind::Reader => &[Measure, TamperSwitch, ReaderFirmware],
        DeviceKind::Pos => &[Measure, RootCheck, DebuggerCheck, HookCheck, EmulatorCheck, OsPatchLevel],
        DeviceKind::Consumer => &[Measure, RootCheck, DebuggerCheck, HookCheck, EmulatorCheck, OsPatchLevel],
    }
}

/// Commands that make sense for a kind beyond its baseline.
fn spot_checks(kind: DeviceKind) -> &'static [CommandKind] {
    use CommandKind::*;
    match kind {
        DeviceKind::Terminal => &[HookCheck, EmulatorCheck, Geo],
        DeviceKind::Reader => &[],
        DeviceKind::Pos | DeviceKind::Consumer => &[Geo],
    }
}

/// `regions`: the regions the reference values measure for this model and firmware.
pub fn choose(
    kind: DeviceKind,
    regions: &[String],
    last_risk: Option<i64>,
    spot_check_share: f64,
    rng: &SystemRandom,
) -> Vec<Command> {
    let full_scan = last_risk.is_some_and(|risk| risk >= FULL_SCAN_RISK);
    let mut kinds: Vec<CommandKind> = baseline(kind).to_vec();
    for &extra in spot_checks(kind) {
        if full_scan || chance(spot_check_share, rng) {
            kinds.push(extra);
        }
    }
    let regions: Vec<String> = if regions.is_empty() {
        default_regions(kind).iter().map(|r| (*r).to_owned()).collect()
    } else {
        regions.to_vec()
    };
    let mut commands = Vec::new();
    for command_kind in kinds {
        if command_kind == CommandKind::Measure {
            for region in &regions {
                commands.push(Command { id: String::new(), kind: command_kind, region: Some(region.clone()) });
            }
        } else {
            commands.push(Command { id: String::new(), kind: command_kind, region: None });
        }
    }
    for (index, command) in commands.iter_mut().enumerate() {
        command.id = format!("c{}", index + 1);
    }
    commands
}

fn chance(share: f64, rng: &SystemRandom) -> bool {
    // A failed RNG means no spot check rather than a failed request; the baseline
    // still runs.
    let roll = random_bytes::<4>(rng).map_or(u32::MAX, u32::from_be_bytes);
    f64::from(roll) / f64::from(u32::MAX) < share
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_is_always_asked_and_ids_are_unique() {
        let rng = SystemRandom::new();
        for kind in DeviceKind::ALL {
            let commands = choose(kind, &[], None, 0.0, &rng);
            for required in baseline(kind) {
                assert!(commands.iter().any(|c| c.kind == *required), "{kind}: {required:?} missing");
            }
            let mut ids: Vec<_> = commands.iter().map(|c| c.id.clone()).collect();
            ids.dedup();
            assert_eq!(ids.len(), commands.len());
        }
    }

    #[test]
    fn risky_devices_get_every_check_and_measure_follows_reference_regions() {
        let rng = SystemRandom::new();
        let commands = choose(DeviceKind::Terminal, &["a".into(), "b".into(), "c".into()], Some(80), 0.0, &rng);
        assert!(commands.iter().any(|c| c.kind == CommandKind::Geo));
        assert!(commands.iter().any(|c| c.kind == CommandKind::HookCheck));
        assert_eq!(commands.iter().filter(|c| c.kind == CommandKind::Measure).count(), 3);
    }

    #[test]
    fn spot_checks_vary() {
        let rng = SystemRandom::new();
        let sizes: std::collections::BTreeSet<usize> =
            (0..64).map(|_| choose(DeviceKind::Terminal, &[], None, 0.5, &rng).len()).collect();
        assert!(sizes.len() > 1, "spot checks never varied: {sizes:?}");
    }
}
