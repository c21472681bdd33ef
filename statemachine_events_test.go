package tenantpg

import (
	"context"
	"errors"
	"runtime"
	"time"

	"github.com/jackc/pgx/v5"
)

// Events: each calls one of the budget's entry points, as a handle, the
// network or a timer would, after telling the model what it must cause.

func (m *stateMachine) register(D *smDB, reserved, maxConns int) {
	p := &dsnParams{cfg: &pgx.ConnConfig{}, workspace: D.ws, maxConns: maxConns, reserved: reserved}
	p.cfg.Database = "db" + D.ws
	m.subf("%s: register reserved %d maxConns %d", D.ws, reserved, maxConns)(func() {
		others := m.reservedSum()
		if D.d != nil {
			others -= D.reserved
		}
		var want string
		switch {
		case m.closed:
			want = "closed"
		case maxConns > m.limit(), others+reserved > m.limit():
			want = "dsn"
		}
		if want == "" {
			// The model of what register does before it shrinks.
			D.reserved, D.maxConns = reserved, maxConns
			D.regs, D.closed = 1, false
			m.exp.idle = m.simShrink()
			m.exp.grow = []*smDB{D}
		}
		d, err := m.b.register(p)
		var dsnErr *DSNError
		switch want {
		case "closed":
			if !errors.Is(err, errDriverClosed) {
				m.fail("register after Close: %v", err)
			}
		case "dsn":
			if !errors.As(err, &dsnErr) {
				m.fail("register: want a DSNError, got %v", err)
			}
		default:
			if err != nil {
				m.fail("register: %v", err)
			}
			for _, x := range m.dbs {
				if x.d == d {
					m.fail("register reused another pool's state")
				}
			}
			D.d = d
		}
	})
}

func (m *stateMachine) expectUnregister(D *smDB) {
	if D.refs() == 0 {
		for _, mb := range m.idleOf(D) {
			m.exp.idle[mb] = reasonUnused
		}
	}
}

// closeDB: D's *sql.DB is closed, and its connector with it: its idle
// backends close at once, whatever handles remain.
func (m *stateMachine) closeDB(D *smDB) {
	m.subf("%s: its *sql.DB is closed", D.ws)(func() {
		D.regs--
		D.closed = true
		for _, mb := range m.idleOf(D) {
			m.exp.idle[mb] = reasonUnused
		}
		m.b.closeOwner(D.d, &owner{})
	})
}

// closeHandle: the handle that made a checkout is done with it.
func (m *stateMachine) closeHandle(D *smDB) {
	m.subf("%s: handle closed", D.ws)(func() {
		D.handles--
		m.expectUnregister(D)
		m.b.unregister(D.d)
	})
}

// take is a checkout by a new handle: the most recently checked-in idle
// backend, or a wait in line. A backend found dead is discarded and the
// checkout starts over, as connector.checkout does.
func (m *stateMachine) take(D *smDB, dead bool) (got *smBackend, queued *smWaiter) {
	retained := false
	for {
		var be *backend
		var mb *smBackend
		m.subf("%s: take", D.ws)(func() {
			if !retained {
				retained = true
				D.handles++
				// A handle of the model; after Close the driver's retain
				// refuses, and take fails the same way below.
				m.b.mu.Lock()
				D.d.refs++
				m.b.mu.Unlock()
			}
			now := m.clk.Now()
			if idle := m.idleOf(D); len(idle) > 0 {
				mb = idle[len(idle)-1]
			}
			var w *waiter
			var err error
			be, w, err = m.b.take(D.d, now, nil)
			switch {
			case m.closed:
				if !errors.Is(err, errDriverClosed) || be != nil || w != nil {
					m.fail("take after Close: %v", err)
				}
				m.followups = append(m.followups, func() { m.closeHandle(D) })
			case err != nil:
				m.fail("take: %v", err)
			case mb != nil:
				if be != mb.be {
					m.fail("%s: take did not return backend %d, the most recently checked in", D.ws, mb.id)
				}
				mb.state, mb.checkedOut = smBusy, now
				m.reused(D)
				m.cov.reuses++
				if m.circ.down {
					m.cov.downHits++
				}
				m.logf("takes idle backend %d", mb.id)
			case be != nil || w == nil:
				m.fail("%s: take returned a backend while the model has none idle", D.ws)
			default:
				queued = m.queue(D, w, now)
			}
		})
		if mb == nil || !(mb.broken || dead) {
			return mb, queued
		}
		dead = false
		m.subf("%s: backend %d found dead: discard", D.ws, mb.id)(func() {
			m.exp.busy, m.exp.busyReason = mb, reasonBroken
			m.exp.grow = []*smDB{D}
			m.cov.discards++
			m.b.discard(be)
		})
	}
}

// queue records a new waiter, checks its patience timer and starts the
// goroutine that waits in await.
func (m *stateMachine) queue(D *smDB, w *waiter, now time.Time) *smWaiter {
	sw := &smWaiter{id: m.newID(), db: D, w: w, since: now, ctx: newSMCtx(), caller: newSMCtx()}
	m.waiters = append(m.waiters, sw)
	m.byW[w] = sw
	D.awaiting++
	m.exp.grow = []*smDB{D}
	b := m.b
	b.mu.Lock()
	seeking, done, pt := w.seeking(), w.done, w.patience
	b.mu.Unlock()
	m.logf("waits as w%d (seeking %v, served %v)", sw.id, seeking, done)
	if !done {
		m.waitCount++
		m.cov.waits++
	} else {
		// Served by the time take returned, but maybe only by a token
		// released as take closed the backend it evicted for it: then
		// it was counted as waiting. check reconciles.
		m.waitAmbiguous = true
	}
	if seeking || done {
		// No patience is needed, though a timer may have been armed
		// before the waiter came to seek or was served as take
		// returned: it must be harmless (seeking) or stopped (served).
		if t, ok := pt.(*smTimer); ok {
			sw.patience = t
			m.roles[t] = sw
		}
	} else {
		t, ok := pt.(*smTimer)
		if !ok {
			m.fail("w%d waits for a busy backend of %s with no patience timer", sw.id, D.ws)
		}
		at, active := t.state()
		dt := time.Duration(m.dialTime)
		if d := at.Sub(now); !active || d != dt && d != 2*dt {
			m.fail("w%d: patience armed for %s (active %v); the dial time is %s", sw.id, d, active, dt)
		}
		sw.patience = t
		m.roles[t] = sw
		m.armed = sw // check tells which of the two once it knows the room
		sw.patienceFor = at.Sub(now)
	}
	go func() {
		be, tok, err := m.b.await(sw.ctx, sw.caller, w)
		m.results <- smResult{id: sw.id, be: be, tok: tok, err: err}
	}()
	return sw
}

func (m *stateMachine) openSocket(tk *smToken, mb *smBackend) *smSocket {
	s := &smSocket{tok: tk, be: mb}
	tk.sockets = append(tk.sockets, s)
	m.b.socketOpened(tk.tok, &trackedConn{})
	return s
}

func (m *stateMachine) startDrain(s *smSocket) {
	s.draining = true
	m.draining = append(m.draining, s)
	m.b.drainStarted()
}

func (m *stateMachine) dialOK(tk *smToken, arg int) {
	D := tk.db
	took := smDialTimes[arg>>3&7]
	nb := &backend{}
	mb := &smBackend{id: m.newID(), db: D, be: nb, tok: tk, state: smBusy}
	m.subf("%s: dial succeeds in %s: backend %d", D.ws, took, mb.id)(func() {
		if arg&0x40 != 0 { // a first socket failed (a TLS fallback): pgx closed it
			m.startDrain(m.openSocket(tk, nil))
		}
		mb.sock = m.openSocket(tk, mb)
		m.io.set(m.io.sockOpen, nb, true)
		m.backends[nb] = mb
		m.alive = append(m.alive, mb)
		m.dialTime = smEWMA(m.dialTime, took, dialTimeAlpha)
		m.paceDialed(tk, took)
		tk.dialing, tk.be = false, mb
		now := m.clk.Now()
		mb.created, mb.checkedOut = now, now
		if m.closed {
			m.exp.busy, m.exp.busyReason = mb, reasonDriverClosed
		} else {
			m.circuitUp(tk)
		}
		got := m.b.dialed(tk.tok, nb, took)
		switch {
		case m.closed && got != nil:
			m.fail("dialed after Close returned the backend")
		case m.closed:
			m.followups = append(m.followups, func() { m.closeHandle(D) })
		case got != nb:
			m.fail("dialed returned another backend")
		}
	})
}

func (m *stateMachine) dialFail(tk *smToken, arg int) {
	D := tk.db
	kind := dialErrorKind(arg >> 2 & 1)
	if arg&0x60 == 0x60 || tk == m.circ.probeTok && arg&0x20 != 0 {
		// A quarter find the server down, half of the probes: enough
		// outages and failed probes for the backoff to grow, few enough
		// that the budget still fills.
		kind = dialDown
	}
	m.subf("%s: dial fails (kind %d, %d sockets)", D.ws, kind, arg%3)(func() {
		for i := 0; i < arg%3; i++ {
			m.startDrain(m.openSocket(tk, nil))
		}
		tk.dialing, tk.closing, tk.ended = false, true, true
		if kind != dialRejected {
			m.dialErrors[kind]++
		}
		m.exp.grow = []*smDB{D}
		m.cov.dialFailures++
		if kind == dialDown {
			m.circuitDown(tk)
		} else {
			m.circuitUp(tk) // the server answered, if only to refuse
		}
		m.b.dialFailed(tk.tok, kind, errSMDial)
	})
	m.followups = append(m.followups, func() { m.closeHandle(D) })
}

// reject: the server refused a dial for lack of slots; the dial closes the
// least recently used idle backend and tries again later.
func (m *stateMachine) reject(tk *smToken) {
	m.subf("%s: the server refuses a dial", tk.db.ws)(func() {
		m.startDrain(m.openSocket(tk, nil))
		m.dialErrors[dialRejected]++
		m.b.countRejection()
		v := m.victim()
		if v != nil {
			m.exp.idle[v] = reasonServerFull
		}
		gone := m.b.relieveServer(tk.tok.db)
		if (gone == nil) != (v == nil) {
			m.fail("relieveServer returned %v; the model's victim is %v", gone, v)
		}
		if v != nil {
			v.tok.gone = gone
			m.cov.rejections++
		}
	})
}

func (m *stateMachine) checkin(mb *smBackend) {
	D := mb.db
	m.subf("%s: check-in of backend %d", D.ws, mb.id)(func() {
		now := m.clk.Now()
		D.useTime = smEWMA(D.useTime, now.Sub(mb.checkedOut), useTimeAlpha)
		m.exp.busy = mb
		m.exp.grow = []*smDB{D}
		switch {
		case mb.broken:
			m.exp.busyReason = reasonBroken
		case m.closed:
			m.exp.busyReason = reasonDriverClosed
		case m.cfg.ConnMaxLifetime > 0 && now.Sub(mb.created) >= m.cfg.ConnMaxLifetime:
			m.exp.busyReason = reasonLifetime
		case D.closed:
			m.exp.busyReason = reasonUnused
		case m.overLimit(D):
			m.exp.busyReason = reasonBudgetShrink
		}
		if m.exp.busyReason == reasonNone && m.live(D) > D.reserved && m.preInFlight < m.slots() {
			for _, sw := range m.preQueue {
				if now.Sub(sw.since) < m.handoffAfter {
					break
				}
				// Only a caller of a database without a backend starves.
				if !sw.preClaim && sw.db != D && m.live(sw.db) == 0 {
					m.exp.busyReason = reasonHandoff
					m.cov.starving++
					break
				}
			}
		}
		if ws := m.waitersOf(D); m.exp.busyReason == reasonNone && len(ws) > 0 {
			m.exp.handoffTo = ws[0]
			m.reused(D)
			mb.checkedOut = now
			m.handoffs++
			m.cov.handoffs++
		} else if m.exp.busyReason == reasonNone {
			mb.state, mb.idleSince, mb.idleSeq = smIdle, now, m.seq
			D.touch = m.seq
		}
		m.b.checkin(mb.be)
	})
	m.followups = append(m.followups, func() { m.closeHandle(D) })
}

func (m *stateMachine) breakBackend(mb *smBackend, sockClosed bool) {
	m.subf("%s: backend %d breaks (socket closed %v)", mb.db.ws, mb.id, sockClosed)(func() {
		mb.broken = true
		m.io.set(m.io.broke, mb.be, true)
		if sockClosed && mb.sock != nil && !mb.sock.draining {
			m.io.set(m.io.sockOpen, mb.be, false)
			m.startDrain(mb.sock)
		}
	})
}

func (m *stateMachine) drain(s *smSocket) {
	tk := s.tok
	m.subf("%s: a socket's drain ends", tk.db.ws)(func() {
		for i, x := range m.draining {
			if x == s {
				m.draining = append(m.draining[:i], m.draining[i+1:]...)
				break
			}
		}
		for i, x := range tk.sockets {
			if x == s {
				tk.sockets = append(tk.sockets[:i], tk.sockets[i+1:]...)
				break
			}
		}
		if s.be != nil {
			s.be.sock = nil
		}
		if tk.ended && len(tk.sockets) == 0 {
			m.exp.grow = []*smDB{tk.db}
		}
		m.cov.drains++
		m.b.socketDrained(tk.tok)
	})
}

// giveUp ends a waiter's wait: its acquire timeout, or its caller's
// cancellation.
func (m *stateMachine) giveUp(sw *smWaiter, timeout bool) {
	D := sw.db
	var be *BudgetError
	var de *ServerDownError
	var open, dbOpen, waiting int
	m.subf("%s: w%d gives up (timeout %v)", D.ws, sw.id, timeout)(func() {
		now := m.clk.Now()
		if timeout {
			sw.ctx.end(context.DeadlineExceeded)
			m.timeouts++
			m.cov.timeouts++
		} else {
			sw.caller.end(context.Canceled)
			sw.ctx.end(context.Canceled)
		}
		m.exp.grow = []*smDB{D}
		r := m.receive()
		for r.id != sw.id {
			// A waiter served as this one left: its goroutine may report
			// first. settle checks that it was served.
			m.early = append(m.early, r)
			r = m.receive()
		}
		D.owe(now.Sub(sw.since))
		if m.circ.down {
			// Its caller learns why no backend came: the server is down.
			de = m.giveUpDown(sw, r, now, timeout)
			m.dropWaiter(sw)
			waiting = len(m.waiters)
			return
		}
		m.exhausted++
		if !errors.As(r.err, &be) || !errors.Is(r.err, ErrBudgetExhausted) || r.be != nil || r.tok != nil {
			m.fail("w%d gave up: got %v", sw.id, r.err)
		}
		m.dropWaiter(sw)
		wantErr := error(context.Canceled)
		if timeout {
			wantErr = nil
		}
		if be.Workspace != D.ws || be.Database != "db"+D.ws || be.Waited != now.Sub(sw.since) || be.Err != wantErr ||
			be.Limit != m.limit() || be.DatabaseCap != m.capOf(D) {
			m.fail("w%d: %+v; the model: waited %s, limit %d, cap %d", sw.id, *be, now.Sub(sw.since), m.limit(), m.capOf(D))
		}
		open, dbOpen, waiting = m.openTotal(), m.counts(D).open, len(m.waiters)
	})
	if de != nil {
		// Counted after the probe's caller, if it was granted as this
		// caller left, has left too.
		if de.Waiting != waiting && de.Waiting != len(m.waiters) {
			m.fail("w%d: %+v; the model: %d waiting (or %d)", sw.id, *de, waiting, len(m.waiters))
		}
		m.followups = append(m.followups, func() { m.closeHandle(D) })
		return
	}
	// The numbers are those of when the wait ended: before, or after, the
	// database's other callers were reconsidered for a dial.
	if be.Open != open && be.Open != m.openTotal() || be.DatabaseOpen != dbOpen && be.DatabaseOpen != m.counts(D).open ||
		be.Waiting != waiting && be.Waiting != len(m.waiters) {
		m.fail("w%d: %+v; the model: open %d/%d, %d/%d for %s, %d waiting (or after the waiter left: %d, %d, %d)",
			sw.id, *be, open, m.limit(), dbOpen, m.capOf(D), D.ws, waiting, m.openTotal(), m.counts(D).open, len(m.waiters))
	}
	m.followups = append(m.followups, func() { m.closeHandle(D) })
}

// fire makes timer t's time come; a late callback (deferred) runs at a
// later event, as a timer's goroutine may.
func (m *stateMachine) fire(t *smTimer, deferred bool) {
	m.clk.expire(t)
	if deferred {
		m.logf("a timer fires; its callback is late")
		m.pending = append(m.pending, t)
		return
	}
	m.runTimer(t)
}

func (m *stateMachine) runTimer(t *smTimer) {
	if sw, ok := m.roles[t].(*smWaiter); ok && m.byW[sw.w] != sw {
		defer m.dropTimer(t) // its waiter is gone: nothing can arm it again
	}
	switch role := m.roles[t].(type) {
	case smProbe:
		m.probeTimer(t, role.s)
	case smReaper:
		m.sub("the reaper runs", func() {
			now := m.clk.Now()
			for _, mb := range m.alive {
				if mb.state == smIdle && !m.expiry(mb).After(now) {
					reason := reasonIdleTimeout
					if l := m.cfg.ConnMaxLifetime; l > 0 && now.Sub(mb.created) >= l {
						reason = reasonLifetime
					}
					m.exp.idle[mb] = reason
					m.cov.reaps++
				}
			}
			t.f()
		})
	case *smWaiter:
		sw := role
		m.subf("%s: w%d's patience runs out", sw.db.ws, sw.id)(func() {
			m.exp.patience = sw
			b := m.b
			b.mu.Lock()
			waiting := !sw.w.done && !sw.w.seeking()
			want := waiting && sw.db.d != nil && m.live(sw.db)+sw.db.d.waiters.seeking < m.capOf(sw.db) && !m.circ.down
			b.mu.Unlock()
			t.f()
			b.mu.Lock()
			seeks := waiting && (sw.w.seeking() || sw.w.done)
			b.mu.Unlock()
			if seeks != want {
				m.fail("w%d: impatient made it seek %v; the model %v", sw.id, seeks, want)
			}
			if want {
				m.cov.patience++
			}
		})
	default:
		m.fail("a timer with no known role fired")
	}
}

// advance moves the clock by d, firing on the way every timer that comes
// due, each at its time.
func (m *stateMachine) advance(d time.Duration) {
	target := m.clk.Now().Add(d)
	for i := 0; ; i++ {
		t := m.clk.earliest()
		if t == nil || t.at.After(target) {
			break
		}
		if i > 1000 {
			m.fail("timers keep firing: the clock does not get to %s", target.Sub(smEpoch))
		}
		m.fire(t, false)
	}
	m.clk.set(target)
}

func (m *stateMachine) reconfigure(arg int) {
	limit := 1 + arg%5
	cfg := smConfig(limit, 1+(arg>>3)%3, smIdleTimeouts[arg>>5&3], smLifetimes[(arg>>3^arg>>6)&3])
	m.subf("reconfigure: limit %d perDB %d idle %s life %s", limit, cfg.MaxConnectionsPerDB, cfg.ConnMaxIdleTime, cfg.ConnMaxLifetime)(func() {
		if limit < m.reservedSum() {
			var ce *ConfigError
			if err := m.b.reconfigure(cfg); !errors.As(err, &ce) {
				m.fail("reconfigure below the reservations: %v", err)
			}
			return
		}
		if limit < m.limit() {
			m.lowered = true
		}
		m.cfg = cfg
		m.exp.idle = m.simShrink()
		for _, D := range m.dbs {
			if D.d != nil {
				m.exp.grow = append(m.exp.grow, D)
			}
		}
		m.cov.reconfigures++
		if err := m.b.reconfigure(cfg); err != nil {
			m.fail("reconfigure: %v", err)
		}
	})
}

// closeDriver runs Close in a goroutine, as it waits for the drains the
// test ends later, and returns once it has done what it does at once.
func (m *stateMachine) closeDriver() {
	m.sub("Close", func() {
		for _, mb := range m.alive {
			if mb.state == smIdle {
				m.exp.idle[mb] = reasonDriverClosed
			}
		}
		m.closed = true
		m.circ.prober = nil // failed with every waiter
		m.closeDone = make(chan struct{})
		go func() {
			m.b.close()
			close(m.closeDone)
		}()
		b := m.b
		for {
			b.mu.Lock()
			started := b.closed && b.jobs == 0
			b.mu.Unlock()
			if started {
				break
			}
			runtime.Gosched()
		}
	})
}

// finish serves every caller that can be served, then ends everything and
// checks that every token came back and every database state was dropped.
func (m *stateMachine) finish() {
	for i := 0; ; i++ {
		if i > 10000 {
			m.fail("no quiescence")
		}
		m.runFollowups()
		if len(m.pending) > 0 {
			t := m.pending[0]
			m.pending = m.pending[1:]
			m.runTimer(t)
		} else if toks := m.dialingTokens(); len(toks) > 0 {
			m.dialOK(toks[0], 0)
		} else if busy := m.busyBackends(); len(busy) > 0 {
			m.checkin(busy[0])
		} else if len(m.draining) > 0 {
			m.drain(m.draining[0])
		} else if t := m.clk.earliest(); t != nil && len(m.waiters) > 0 {
			m.fire(t, false)
		} else {
			break
		}
	}
	// Whoever still waits can never be served: no token is free for it
	// and none can be freed.
	for _, sw := range m.waiters {
		if m.room(sw.db) || m.victimFor(sw.db) != nil {
			m.fail("w%d of %s still waits with nothing else going on", sw.id, sw.db.ws)
		}
	}
	for len(m.waiters) > 0 {
		m.giveUp(m.waiters[0], true)
		m.runFollowups()
	}
	for _, D := range m.dbs {
		for D.regs > 0 {
			m.closeDB(D)
		}
	}
	if !m.closed {
		m.closeDriver()
	}
	m.runFollowups()
	for len(m.draining) > 0 {
		m.drain(m.draining[0])
	}
	for len(m.pending) > 0 {
		t := m.pending[0]
		m.pending = m.pending[1:]
		m.runTimer(t)
	}
	b := m.b
	b.mu.Lock()
	defer b.mu.Unlock()
	m.locked = true
	if b.open != 0 || len(b.poolsLocked()) != 0 || len(b.servers) != 0 || b.waiting != 0 {
		m.fail("after everything closed: open %d, %d database states, %d servers, waiting %d",
			b.open, len(b.poolsLocked()), len(b.servers), b.waiting)
	}
	for _, t := range m.clk.all() {
		if _, active := t.state(); active {
			m.fail("a timer still armed after Close")
		}
	}
}
