//! The console proxy scale rule: CloudStack's scale-out plus scale-in with hysteresis, as a pure
//! function of the zone's proxies and settings.
//!
//! Invariants: scaling in leaves capacity strictly above the standby (scaling out starts at or
//! below it), so one decision never undoes the other; a draining proxy is not capacity; never
//! fewer than one proxy, never more than `consoleproxy.launch.max`.

/// A console proxy as the scaling rule sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyView {
    /// Id.
    pub id: String,
    /// Its agent is Up and it takes sessions.
    pub running: bool,
    /// Being drained for scale-in.
    pub draining: bool,
    /// Open sessions.
    pub sessions: u64,
    /// Seconds it has had no session (`None`: it has sessions).
    pub idle_secs: Option<u64>,
}

/// Scaling settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleRule {
    /// `consoleproxy.session.max`.
    pub session_max: u64,
    /// `consoleproxy.capacity.standby`.
    pub standby: u64,
    /// `consoleproxy.launch.max`.
    pub launch_max: u64,
    /// `consoleproxy.scalein.idle`: seconds a proxy must be idle before it is drained.
    pub idle_secs: u64,
    /// `consoleproxy.scale.cooldown`: seconds between scale decisions in a zone.
    pub cooldown_secs: u64,
}

/// What to do with a zone's console proxies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing.
    Hold,
    /// Start one more proxy.
    ScaleOut,
    /// Drain this proxy, then destroy it.
    ScaleIn(String),
}

/// CloudStack's scale-out rule plus scale-in with hysteresis (see the module documentation).
/// `since_last_scale_secs` is `None` when the zone never scaled.
pub fn decide(proxies: &[ProxyView], rule: &ScaleRule, since_last_scale_secs: Option<u64>) -> Decision {
    let serving: Vec<&ProxyView> = proxies.iter().filter(|p| !p.draining).collect();
    let n = serving.len() as u64;
    if n == 0 {
        return Decision::ScaleOut;
    }
    let sessions: u64 = proxies.iter().map(|p| p.sessions).sum();
    let capacity = |count: u64| (count * rule.session_max).saturating_sub(sessions);
    let cooled = since_last_scale_secs.is_none_or(|s| s >= rule.cooldown_secs);
    if capacity(n) <= rule.standby {
        return if n < rule.launch_max.max(1) && cooled {
            Decision::ScaleOut
        } else {
            Decision::Hold
        };
    }
    if n > 1 && cooled && capacity(n - 1) > rule.standby {
        let idle = serving
            .iter()
            .filter(|p| p.running && p.sessions == 0 && p.idle_secs.is_some_and(|s| s >= rule.idle_secs))
            .max_by_key(|p| p.idle_secs);
        if let Some(p) = idle {
            return Decision::ScaleIn(p.id.clone());
        }
    }
    Decision::Hold
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: &str, sessions: u64, idle: Option<u64>) -> ProxyView {
        ProxyView {
            id: id.into(),
            running: true,
            draining: false,
            sessions,
            idle_secs: idle,
        }
    }

    const RULE: ScaleRule = ScaleRule {
        session_max: 10,
        standby: 5,
        launch_max: 3,
        idle_secs: 60,
        cooldown_secs: 30,
    };

    #[test]
    fn scales_out_by_cloudstacks_rule() {
        assert_eq!(decide(&[], &RULE, None), Decision::ScaleOut);
        // 1 × 10 − 4 = 6 > 5: enough.
        assert_eq!(decide(&[p("a", 4, None)], &RULE, None), Decision::Hold);
        // 1 × 10 − 5 = 5 ≤ 5: one more.
        assert_eq!(decide(&[p("a", 5, None)], &RULE, None), Decision::ScaleOut);
        // Capped by launch.max.
        let full = [p("a", 10, None), p("b", 10, None), p("c", 9, None)];
        assert_eq!(decide(&full, &RULE, None), Decision::Hold);
        // Cooldown.
        assert_eq!(decide(&[p("a", 5, None)], &RULE, Some(10)), Decision::Hold);
        assert_eq!(decide(&[p("a", 5, None)], &RULE, Some(30)), Decision::ScaleOut);
    }

    #[test]
    fn scales_in_idle_proxies_with_hysteresis() {
        // 2 × 10 − 2 = 18; without b: 10 − 2 = 8 > 5, b idle long enough → drain b.
        let two = [p("a", 2, None), p("b", 0, Some(120))];
        assert_eq!(decide(&two, &RULE, None), Decision::ScaleIn("b".into()));
        // Not idle long enough, or cooling down: hold.
        assert_eq!(
            decide(&[p("a", 2, None), p("b", 0, Some(10))], &RULE, None),
            Decision::Hold
        );
        assert_eq!(decide(&two, &RULE, Some(5)), Decision::Hold);
        // Without b: 10 − 5 = 5, not > 5: keep b (scaling in would trigger scaling out).
        assert_eq!(
            decide(&[p("a", 5, None), p("b", 0, Some(120))], &RULE, None),
            Decision::Hold
        );
        // Never below one proxy.
        assert_eq!(decide(&[p("a", 0, Some(999))], &RULE, None), Decision::Hold);
    }

    #[test]
    fn no_flapping_between_the_two_rules() {
        // For every load, a zone that just scaled in does not meet the scale-out rule, and one
        // that just scaled out does not meet the scale-in rule.
        for n in 1..=3u64 {
            for sessions in 0..=n * RULE.session_max {
                let mut proxies: Vec<ProxyView> = (0..n).map(|i| p(&format!("p{i}"), 0, Some(999))).collect();
                proxies[0].sessions = sessions;
                if let Decision::ScaleIn(id) = decide(&proxies, &RULE, None) {
                    proxies.retain(|x| x.id != id);
                    assert_ne!(
                        decide(&proxies, &RULE, None),
                        Decision::ScaleOut,
                        "n={n} s={sessions}"
                    );
                }
            }
        }
    }

    #[test]
    fn draining_proxies_do_not_count_as_capacity() {
        let mut d = p("b", 0, Some(999));
        d.draining = true;
        assert_eq!(decide(&[p("a", 5, None), d], &RULE, None), Decision::ScaleOut);
    }
}
