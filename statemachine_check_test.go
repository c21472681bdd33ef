package tenantpg

import "time"

// check compares the budget with the model after a sub-step.
func (m *stateMachine) check() {
	m.t.Helper()
	if m.closed {
		m.checkCloseReturn()
	}
	b := m.b
	b.mu.Lock()
	defer b.mu.Unlock()
	m.locked = true
	defer func() { m.locked = false }()
	if err := b.checkInvariantsLocked(); err != nil {
		m.fail("invariant: %v", err)
	}
	// Timers: every one armed belongs to the reaper or to a waiter.
	for _, t := range m.clk.all() {
		if _, ok := m.roles[t]; ok {
			continue
		}
		if rt, ok := b.reaper.timer.(*smTimer); ok && rt == t {
			m.roles[t] = smReaper{}
			continue
		}
		if s := b.servers[serverKey{}]; s != nil {
			if wt, ok := s.circuit.wake.timer.(*smTimer); ok && wt == t {
				m.roles[t] = smProbe{s}
				continue
			}
		}
		m.fail("a timer armed for something the model does not know")
	}

	// Databases: forgotten exactly when nothing uses them and they hold no
	// token; otherwise the budget's numbers are the model's.
	totalOpen := 0
	anyState := false
	for _, D := range m.dbs {
		c := m.counts(D)
		totalOpen += c.open
		if D.d == nil {
			continue
		}
		if D.refs() == 0 && c.open == 0 {
			if b.keepsLocked(D.d) {
				m.fail("%s: nothing uses it and it holds nothing, yet it is not forgotten", D.ws)
			}
			m.logf("%s forgotten", D.ws)
			*D = smDB{i: D.i, ws: D.ws}
			continue
		}
		d := D.d
		if !b.keepsLocked(d) {
			m.fail("%s: forgotten while used (refs %d) or holding %d tokens", D.ws, D.refs(), c.open)
		}
		if d.tokens.open != c.open || d.tokens.closing != c.closing || d.tokens.dialing != c.dialing || d.tokens.inUse != c.busy || d.tokens.idle != c.idle {
			m.fail("%s: open %d closing %d dialing %d inUse %d idle %d; the model: %d %d %d %d %d",
				D.ws, d.tokens.open, d.tokens.closing, d.tokens.dialing, d.tokens.inUse, d.tokens.idle, c.open, c.closing, c.dialing, c.busy, c.idle)
		}
		if d.refs != D.refs() {
			m.fail("%s: refs %d, the model %d (regs %d handles %d awaiting %d)", D.ws, d.refs, D.refs(), D.regs, D.handles, D.awaiting)
		}
		anyState = true
		if d.tokens.reserved != D.reserved || d.capOverride != D.maxConns || b.capLocked(d) != m.capOf(D) {
			m.fail("%s: reserved %d maxConns %d cap %d; the model %d %d %d", D.ws, d.tokens.reserved, d.capOverride, b.capLocked(d), D.reserved, D.maxConns, m.capOf(D))
		}
		if float64(d.growth.useTime) != D.useTime {
			m.fail("%s: use time %v, the model %v", D.ws, float64(d.growth.useTime), D.useTime)
		}
		if d.protected != D.prot {
			if !D.protAmbiguous {
				m.fail("%s: protected %v, the model %v", D.ws, d.protected, D.prot)
			}
			D.prot = d.protected
		}
		idle := m.idleOf(D)
		i := len(idle) - 1
		for be := d.idleBackends.front; be != nil; be = d.idleBackends.next(be) {
			if i < 0 || idle[i].be != be {
				m.fail("%s: idle list out of order: the most recently checked in must come first", D.ws)
			}
			i--
		}
		ws := m.waitersOf(D)
		i = 0
		for w := d.waiters.front; w != nil; w = d.waiters.next(w) {
			if i >= len(ws) || ws[i].w != w {
				m.fail("%s: waiters out of arrival order", D.ws)
			}
			i++
		}
	}
	if !anyState {
		// The budget forgets a server with its last database, dial pacing
		// included: the next database on it starts from scratch.
		if len(b.servers) != 0 {
			m.fail("no database state left, yet %d servers kept", len(b.servers))
		}
		if m.paceSlots != initialDialSlots || m.paceGood != 0 || m.paceEpoch != 0 || len(m.paceDials) != 0 {
			m.logf("server forgotten: dial pacing restarts")
		}
		m.paceSlots, m.paceGood, m.paceEpoch, m.paceDials = initialDialSlots, 0, 0, nil
	}
	m.checkCircuit()
	_, sharedLive := m.shared()
	switch {
	case b.open != totalOpen:
		m.fail("budget holds %d tokens; the model counts %d", b.open, totalOpen)
	case m.srv().ledger.reserved != m.reservedSum():
		m.fail("budget reserves %d; the model %d", m.srv().ledger.reserved, m.reservedSum())
	case b.waiting != len(m.waiters):
		m.fail("budget has %d waiting; the model %d", b.waiting, len(m.waiters))
	case float64(b.dialTime) != m.dialTime:
		m.fail("dial time %v, the model %v", float64(b.dialTime), m.dialTime)
	case b.counters.evictions != m.evictions:
		m.fail("evictions %v, the model %v", b.counters.evictions, m.evictions)
	case m.waitAmbiguous && b.counters.waitCount == m.waitCount+1:
		m.waitCount++
	}
	m.waitAmbiguous = false
	switch {
	case b.counters.handoffs != m.handoffs || b.counters.dials != m.dials || b.counters.exhausted != m.exhausted || b.counters.timeouts != m.timeouts || b.counters.waitCount != m.waitCount:
		m.fail("handoffs %d dials %d exhausted %d timeouts %d waits %d; the model %d %d %d %d %d",
			b.counters.handoffs, b.counters.dials, b.counters.exhausted, b.counters.timeouts, b.counters.waitCount, m.handoffs, m.dials, m.exhausted, m.timeouts, m.waitCount)
	case b.counters.dialErrors != m.dialErrors:
		m.fail("dial errors %v, the model %v", b.counters.dialErrors, m.dialErrors)
	}
	for _, mb := range m.alive {
		want := map[smBState]backendState{smBusy: backendBusy, smIdle: backendIdle}[mb.state]
		if mb.be.state != want {
			m.fail("backend %d of %s in state %d; the model %d", mb.id, mb.db.ws, mb.be.state, want)
		}
	}

	// Safety: the open count never grows beyond the budget, nor a
	// database's live backends beyond its cap; a lowered limit leaves more
	// open only until busy backends come back.
	if b.open > b.limit && (b.open > m.preOpen || !m.lowered) {
		m.fail("open %d over the budget %d (was %d)", b.open, b.limit, m.preOpen)
	}
	if inUse, _ := m.shared(); inUse > m.limit()-m.reservedSum() && inUse > m.preShared && m.reservedSum() == m.preReserved {
		m.fail("the shared pool grew to %d over its %d", inUse, m.limit()-m.reservedSum())
	}
	for _, D := range m.dbs {
		if D.d == nil {
			continue
		}
		if l := m.live(D); l > m.capOf(D) && l > m.preLive[D] {
			m.fail("%s grew to %d live backends over its cap %d", D.ws, l, m.capOf(D))
		}
		if len(m.idleOf(D)) > 0 && m.overLimit(D) && !(m.live(D) <= D.reserved) {
			if m.live(D) > m.capOf(D) || sharedLive > m.limit()-m.reservedSum() {
				m.fail("%s is over its limits with an idle backend left", D.ws)
			}
		}
	}

	// Liveness: no caller waits for a token while a victim could be
	// evicted for it; the reaper is armed for the earliest idle expiry.
	// Pacing: no dial or claim starts beyond the slots.
	inFlight := m.inFlightLocked()
	if inFlight > m.slots() && inFlight > m.preInFlight {
		m.fail("%d dials and claims under way, over the %d dial slots (was %d)", inFlight, m.slots(), m.preInFlight)
	}
	sv := m.srv()
	if sv.queue.claims != inFlight-len(m.dialingTokens()) {
		m.fail("the budget counts %d claims; %d waiters hold one", sv.queue.claims, inFlight-len(m.dialingTokens()))
	}
	for w := sv.queue.front; w != nil && inFlight < m.slots(); w = sv.queue.next(w) {
		if D := m.byW[w].db; w.claim == nil && m.room(D) && m.live(D) < m.capOf(D) {
			m.fail("a caller of %s waits for a token while one is free for it", D.ws)
		}
		if w.claim == nil && m.live(m.byW[w].db) > 0 && m.victimFor(m.byW[w].db) == nil && m.victim() != nil {
			m.cov.growthHeld++
		}
		// A grower waits for a spare backend to age only until the next
		// event on the server (no timer marks the moment): only misses
		// are held to it here; the growth victims taken are checked in
		// settle.
		if victim := m.victimFor(m.byW[w].db); w.claim == nil && victim != nil && m.live(m.byW[w].db) == 0 {
			m.fail("a caller of %s waits for a token while backend %d of %s could be evicted for it", w.db.workspace, victim.id, victim.db.ws)
		}
	}
	var first time.Time
	idle := 0
	for _, mb := range m.alive {
		if mb.state == smIdle {
			idle++
			if at := m.expiry(mb); first.IsZero() || at.Before(first) {
				first = at
			}
		}
	}
	if now := m.clk.Now(); idle > 0 && first.Before(now) {
		first = now // past due: armed for now is in time
	}
	if idle > 0 {
		if m.closed {
			m.fail("an idle backend after Close")
		}
		ok := false
		for t, role := range m.roles {
			if _, r := role.(smReaper); r {
				at, active := t.state()
				ok = ok || active && !at.After(first)
				for _, p := range m.pending {
					ok = ok || p == t
				}
			}
		}
		if !ok {
			m.fail("idle backends, the first expiring at %s, and no reaper armed by then", first.Sub(smEpoch))
		}
	}

	// Patience lasts a dial, twice that when the budget is full (the dial
	// evicts): the room take saw is the room now, unless a token came back
	// as take returned.
	if sw := m.armed; sw != nil && len(m.released) == 0 {
		want := time.Duration(m.dialTime)
		if !m.room(sw.db) {
			want *= 2
		}
		if sw.patienceFor != want {
			m.fail("w%d: patience armed for %s; a dial costs %s (room %v)", sw.id, sw.patienceFor, want, m.room(sw.db))
		}
	}
	m.armed = nil

	// Wait-or-dial: a waiter starts seeking a token only when the queue
	// justifies a dial (or its patience ran out), and a queue that
	// justifies one has a seeker after growLocked ran.
	dt := time.Duration(m.dialTime)
	for _, D := range m.dbs {
		if D.d == nil {
			continue
		}
		starts := 0
		for _, sw := range append(m.waitersOf(D), m.grantedNow...) {
			if sw == m.circ.prober || sw.tok != nil && sw.tok == m.circ.probeTok {
				continue // the probe dials for the server, whatever the growth rule
			}
			if sw.db == D && sw != m.exp.patience && !sw.preSeeking && (sw.granted || sw.w.seeking()) {
				starts++
			}
		}
		n := m.live(D) + D.d.waiters.seeking
		q := D.d.waiters.len - D.d.waiters.seeking
		if starts > 0 && !m.shouldDial(D, n-1, q+1, dt, D.debt) {
			m.fail("%s: a waiter started seeking a token though %d backends serve %d queued callers (use time %s, dial %s, waits owed at most %s)",
				D.ws, n-1, q+1, time.Duration(D.useTime), dt, time.Duration(D.debt))
		}
		if starts > 0 && m.exp.patience == nil {
			D.debt = D.owed // paid by the dial, but for what may have been owed since
		}
		if D.d.growth.waitDebt > D.debt*(1+1e-9)+1 {
			m.fail("%s: wait debt %s, more than the %s waited since the last dial", D.ws, time.Duration(D.d.growth.waitDebt), time.Duration(D.debt))
		}
	}
	for _, D := range m.exp.grow {
		if D.d == nil || m.circ.down {
			continue
		}
		n := m.live(D) + D.d.waiters.seeking
		q := D.d.waiters.len - D.d.waiters.seeking
		if q > 0 && m.shouldDial(D, n, q, 2*dt, -1) {
			m.fail("%s: %d callers wait on %d backends (use time %s, dial %s) and none seeks a token",
				D.ws, q, n, time.Duration(D.useTime), dt)
		}
	}
}

// checkCloseReturn: Driver.Close returns once every socket has drained,
// and not before.
func (m *stateMachine) checkCloseReturn() {
	if m.closeReturned {
		return // busy backends checked in later are closed without it
	}
	if len(m.draining) == 0 {
		select {
		case <-m.closeDone:
			m.closeReturned = true
		case <-time.After(smHang):
			m.fail("Close did not return though every socket has drained")
		}
		return
	}
	select {
	case <-m.closeDone:
		m.fail("Close returned with %d sockets still draining", len(m.draining))
	default:
	}
}
