package tenantpg

import "time"

// The budget's numbers, for Stats (stats.go) and the metrics (otel.go),
// which never take the lock themselves: the cumulative counters, kept in
// one struct and copied whole, and the gauges of every server and pool,
// copied under the lock by snapshotLocked.

// counters are the budget's cumulative counts. Guarded by budget.mu.
type counters struct {
	dials        uint64
	waitCount    uint64 // callers not served at once
	waitDuration time.Duration
	timeouts     uint64
	exhausted    uint64 // BudgetErrors returned
	handoffs     uint64 // backends passed from one caller straight to the next
	leaks        uint64 // backends held longer than the leak threshold, counted once each
	collections  uint64 // garbage collections triggered for stray handles
	evictions    [numReasons]uint64
	dialErrors   [numDialErrorKinds]uint64
}

// snapshot is the budget's state copied under the lock.
type snapshot struct {
	counters                                                                counters
	limit, reserved, open, inUse, idle, dialing, closing, waiting, peakOpen int
	longestUse, dialTime                                                    time.Duration
	dbs                                                                     []dbSnapshot
	servers                                                                 []serverSnapshot
}

type serverSnapshot struct {
	srv                                                                       *server // for its metric attributes, which are not guarded by mu
	label                                                                     string
	limit, reserved, open, inUse, idle, dialing, closing, peakOpen, dialSlots int
	down                                                                      bool
	since                                                                     time.Time
	downFor                                                                   time.Duration
	waiting                                                                   int
	outages, failed                                                           uint64
	lastErr                                                                   string
	fleet                                                                     *FleetStats
}

type dbSnapshot struct {
	db                                                 *backendPool // for its metric attributes, which are not guarded by mu
	workspace, name                                    string
	open, inUse, idle, dialing, closing, cap, reserved int
	waiting                                            int
	lastUsed                                           time.Time
	evictions                                          uint64
	longestUse, useTime                                time.Duration
}

// snapshotLocked copies the budget's numbers and those of every pool that
// holds backends, reserves them or has callers waiting.
func (b *budget) snapshotLocked() snapshot {
	now := b.clock.Now()
	s := snapshot{counters: b.counters, waiting: b.waiting, peakOpen: b.peakOpen, dialTime: b.dialTime.duration()}
	for _, x := range b.servers {
		for p := x.pools.front; p != nil; p = x.pools.next(p) {
			t := &p.tokens
			if t.open == 0 && t.reserved == 0 && p.waiters.len == 0 {
				continue
			}
			ps := dbSnapshot{db: p, workspace: p.workspace, name: p.name, open: t.open, inUse: t.inUse, idle: t.idle,
				dialing: t.dialing, closing: t.closing, cap: b.capLocked(p), reserved: t.reserved, waiting: p.waiters.len,
				lastUsed: p.lastUsed, evictions: p.evictions, useTime: p.growth.useTime.duration()}
			if be := p.busy.front; be != nil {
				ps.longestUse = now.Sub(be.checkedOut)
				s.longestUse = max(s.longestUse, ps.longestUse)
			}
			s.dbs = append(s.dbs, ps)
		}
		l, c := &x.ledger, &x.circuit
		ss := serverSnapshot{srv: x, label: x.label, limit: l.limit, reserved: l.reserved, open: l.open, inUse: l.inUse,
			idle: l.idle, dialing: l.dialing, closing: l.closing, peakOpen: l.peakOpen, dialSlots: min(x.pace.slots, l.limit),
			waiting: x.waiting, down: c.down, outages: c.outages, failed: c.failed}
		if c.down {
			ss.since, ss.downFor = c.since, now.Sub(c.since)
			if c.lastErr != nil {
				ss.lastErr = c.lastErr.Error()
			}
		}
		if f := x.lease.coord; f != nil {
			fs := f.stats() // lock order: budget.mu, then the coordinator's
			ss.fleet = &fs
		}
		s.servers = append(s.servers, ss)
		s.limit += l.limit
		s.reserved += l.reserved
		s.open += l.open
		s.inUse += l.inUse
		s.idle += l.idle
		s.dialing += l.dialing
		s.closing += l.closing
	}
	if len(b.servers) == 0 {
		s.limit = b.limit
	}
	return s
}
