package tenantpg

import (
	"maps"
	"time"
)

// Limits changing: Configure, and a fleet budget's leases. Lowering a limit
// closes idle backends down to it at once (shrinkLocked, checkin.go); busy
// ones close as they are checked in (checkinReasonLocked). Raising it
// serves the callers waiting.

// applyLocked takes cfg's settings.
func (b *budget) applyLocked(cfg Config) {
	b.limit = cfg.MaxConnections
	b.serverLimits = cfg.ServerMaxConnections
	b.aliases = cfg.ServerAliases
	b.fleet = fleetSettingsOf(cfg)
	for _, s := range b.servers {
		s.ledger.max = b.serverLimitLocked(s.label)
		s.ledger.limit = s.lease.limit(s.ledger.max, b.clock.Now())
	}
	b.perDB = cfg.MaxConnectionsPerDB
	b.lifetime = cfg.ConnMaxLifetime
	b.idleTimeout = cfg.ConnMaxIdleTime
	b.acquireTimeout = cfg.AcquireTimeout
	b.leakThreshold.Store(int64(cfg.LeakThreshold))
	b.log.Store(cfg.Logger)
}

// reconfigureLocked applies new settings, or returns why they cannot be.
// Lowering the budget or a cap closes idle backends down to the new limits
// at once; busy ones are closed when they are checked in. Raising it serves
// waiters.
func (b *budget) reconfigureLocked(cfg Config) error {
	if !maps.Equal(cfg.ServerAliases, b.aliases) && len(b.servers) > 0 {
		return &ConfigError{Field: "ServerAliases",
			Reason: "aliases cannot change while pools are open: their backends count against the server they were opened on"}
	}
	if fleetSettingsOf(cfg) != b.fleet && len(b.servers) > 0 {
		// A server in use would be coordinated only from its next DSN on,
		// with backends no lease covers.
		return &ConfigError{Field: "FleetMaxConnections",
			Reason: "the fleet settings cannot change while databases are open; set them before the first connection"}
	}
	for _, s := range b.servers {
		if limit := serverLimit(cfg.MaxConnections, cfg.ServerMaxConnections, s.label); limit < s.ledger.reserved {
			field := "MaxConnections"
			if _, ok := cfg.ServerMaxConnections[s.label]; ok {
				field = "ServerMaxConnections[" + s.label + "]"
			}
			return &ConfigError{Field: field, Reason: errReservedExceedsBudget(limit, s.ledger.reserved)}
		}
	}
	b.applyLocked(cfg)
	now := b.clock.Now()
	idle := 0
	for _, s := range b.servers {
		b.shrinkLocked(s)
		b.serveQueueLocked(s)
		idle += s.ledger.idle
	}
	for _, s := range b.servers {
		for p := s.pools.front; p != nil; {
			next := s.pools.next(p)
			b.growLocked(p)
			p = next
		}
	}
	// The timeouts may have changed. Disarm even with nothing idle: a later
	// check-in skips arming a reaper armed early enough, and the old time
	// may be later than the new idle timeout allows.
	b.reaper.stop()
	if idle > 0 {
		b.armReaperLocked(now, now) // rescan now
	}
	// The leak threshold may have changed too: rescan now (a threshold
	// turned off empties the watch list).
	b.watch.timer.stop()
	if b.watch.watched.len > 0 {
		b.armLeakCheckLocked(now, now)
	}
	return nil
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

// capLocked returns the most live backends p may hold.
func (b *budget) capLocked(p *backendPool) int {
	c := b.perDB
	if p.capOverride > 0 {
		c = p.capOverride
	}
	if m := p.srv.ledger.max; c > m {
		c = m // not the fleet's share: a caller at it waits for a lease, not for a backend of its own
	}
	if c < p.tokens.reserved {
		c = p.tokens.reserved
	}
	return c
}

// refreshLimitLocked applies a change of what s may hold: a higher limit
// serves its callers, a lower one closes idle backends down to it (busy
// ones close as they are checked in).
func (b *budget) refreshLimitLocked(s *server, reason evictReason) {
	old := s.ledger.limit
	s.ledger.limit = s.lease.limit(s.ledger.max, b.clock.Now())
	switch {
	case s.ledger.limit > old:
		b.serveQueueLocked(s)
		for p := s.pools.front; p != nil; {
			next := s.pools.next(p)
			if p.waiters.len > p.waiters.seeking {
				b.growLocked(p)
			}
			p = next
		}
	case s.ledger.limit < old:
		b.shrinkOverLocked(s, reason)
	}
}

// The fleet coordinator's calls (fleetSide, budget.go).

// fleetNeedLocked returns how many slots s should lease at now, once a
// yield that has ended is lifted.
func (b *budget) fleetNeedLocked(s *server, now time.Time) int {
	if s.lease.yieldEnded(now) {
		b.refreshLimitLocked(s, reasonFleet)
	}
	return s.lease.need(&s.ledger, s.queue.len-s.queue.claims, now)
}

// fleetSetHeldLocked records that n slots are leased for s's backends; a
// lower n is refused while s holds more.
func (b *budget) fleetSetHeldLocked(s *server, n int) bool {
	if !s.lease.setHeld(n, s.ledger.open) {
		return false
	}
	b.refreshLimitLocked(s, reasonFleet)
	return true
}

// fleetYieldLocked gives up to n of s's slots to other processes: idle
// backends close at once, down to what its callers use now, and busy ones
// beyond the fair share close as they are checked in, so that a busy
// process keeps its fair share and no more while others need slots. The
// cap lasts fleetYieldFor; the coordinator releases the slots once their
// backends are gone.
func (b *budget) fleetYieldLocked(s *server, n, fair int) {
	l := &s.ledger
	if s.lease.yield(n, fair, l.open-l.closing, l.inUse+l.dialing+s.queue.len, b.clock.Now()) {
		b.refreshLimitLocked(s, reasonFleet)
	}
}

// fleetLostLocked lowers s to n at once, whatever it holds open (a lost
// coordination session).
func (b *budget) fleetLostLocked(s *server, n int) {
	s.lease.lost(n)
	b.refreshLimitLocked(s, reasonFleet)
}

// fleetFloorLocked keeps s at n backends at least, leases or not.
func (b *budget) fleetFloorLocked(s *server, n int) {
	s.lease.floor = n
	b.refreshLimitLocked(s, reasonFleet)
}

// fleetOpenLocked reports whether a server with a fleet budget still has
// backends open: its slots must not be unlocked yet.
func (b *budget) fleetOpenLocked() bool {
	for _, s := range b.servers {
		if s.lease.coord != nil && s.ledger.open > 0 {
			return true
		}
	}
	return false
}
