package tenantpg

import "time"

// applyLocked takes cfg's settings; reconfigure calls it under mu.
func (b *budget) applyLocked(cfg Config) {
	b.limit = cfg.MaxConnections
	b.serverLimits = cfg.ServerMaxConnections
	b.aliases = cfg.ServerAliases
	b.fleet = fleetSettingsOf(cfg)
	for _, s := range b.servers {
		s.max = b.serverLimitLocked(s.label)
		s.limit = b.limitNowLocked(s)
	}
	b.perDB = cfg.MaxConnectionsPerDB
	b.lifetime = cfg.ConnMaxLifetime
	b.idleTimeout = cfg.ConnMaxIdleTime
	b.acquireTimeout = cfg.AcquireTimeout
	b.leakThreshold.Store(int64(cfg.LeakThreshold))
	b.log.Store(cfg.Logger)
}

// serverLimitLocked returns the budget of the server named label
// (host:port).
func (b *budget) serverLimitLocked(label string) int {
	return serverLimit(b.limit, b.serverLimits, label)
}

// serverLimit returns the budget of the server named label: its own figure
// if it has one, else the default.
func serverLimit(def int, perServer map[string]int, label string) int {
	if n, ok := perServer[label]; ok {
		return n
	}
	return def
}

// capLocked returns d's cap; guarded by mu.
func (b *budget) capLocked(d *backendPool) int {
	c := b.perDB
	if d.capOverride > 0 {
		c = d.capOverride
	}
	if c > d.srv.max {
		c = d.srv.max // not the fleet's share: a caller at it waits for a lease, not for a backend of its own
	}
	if c < d.reserved {
		c = d.reserved
	}
	return c
}

// shrinkLocked evicts idle backends of s until every database is within
// its cap and the shared pool within s's budget, counting backends already
// closing as gone.
func (b *budget) shrinkLocked(s *server) { b.shrinkOverLocked(s, reasonBudgetShrink) }

// shrinkOverLocked is shrinkLocked, closing backends for reason.
func (b *budget) shrinkOverLocked(s *server, reason evictReason) {
	s.recency.eachLocked(func(x *backendPool) {
		for x.open-x.closing > b.capLocked(x) && x.idleBackends.back != nil {
			b.evictLocked(x.idleBackends.back, reason, nil)
		}
	})
	for s.sharedLive > s.limit-s.reserved {
		v := s.recency.victimLocked()
		if v == nil {
			return
		}
		b.evictLocked(v, reason, nil)
	}
}

// limitNowLocked returns what s may hold now: its configured budget, or
// with a fleet budget the slots its coordinator leased for backends, within
// that budget less the coordination session, and within the cap it yields
// to while other processes need slots; never below its floor, which only
// sessions of another role holding the fleet's slots raise.
func (b *budget) limitNowLocked(s *server) int {
	if s.fleet == nil {
		return s.max
	}
	l := min(s.max-1, s.held)
	if b.clock.Now().Before(s.capUntil) {
		l = min(l, s.fleetCap)
	}
	return max(l, min(s.fleetFloor, s.max-1), 0)
}

// refreshLimitLocked applies a change of what s may hold: a higher limit
// serves its callers, a lower one closes idle backends down to it (busy
// ones close as they are checked in).
func (b *budget) refreshLimitLocked(s *server, reason evictReason) {
	old := s.limit
	s.limit = b.limitNowLocked(s)
	switch {
	case s.limit > old:
		b.serveQueueLocked(s)
		for d := range b.dbs {
			if d.srv == s && d.waiters.len > d.seeking {
				b.growLocked(d)
			}
		}
	case s.limit < old:
		b.shrinkOverLocked(s, reason)
	}
}

// fleetCloseTimeout bounds how long Driver.Close waits for the backends on
// a fleet's server to close (busy ones are closed when they are checked
// in), and then for the coordination session to unlock its slots; past it
// the session is cut, which frees them on the server too.
const fleetCloseTimeout = 5 * time.Second

// fleetYieldFor is how long a process holds to the cap it lowered itself
// to for other processes, as long as a need heard from another counts
// (fleetHeard).
const fleetYieldFor = fleetHeard

// fleetOpenLocked reports whether a server with a fleet budget still has
// backends open: its slots must not be unlocked yet.
func (b *budget) fleetOpenLocked() bool {
	for _, s := range b.servers {
		if s.fleet != nil && s.open > 0 {
			return true
		}
	}
	return false
}
