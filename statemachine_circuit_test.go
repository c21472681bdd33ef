package tenantpg

import (
	"context"
	"errors"
	"time"
)

// The model of the server's circuit (circuit.go, outage.go): a dial that
// finds the server down trips it, one probe at a time dials after a
// jittered backoff, and any answer resets it. The jitter is not predicted:
// the model reads the probe's time from the budget once it is drawn, and
// checks it lies within the backoff's bounds.

// smCircuit is the model's circuit. Its counters live and die with the
// server, as the budget's do.
type smCircuit struct {
	down     bool
	since    time.Time
	failures int       // probes failed since it went down
	probeAt  time.Time // read from the budget when drawn
	drawn    bool      // the sub-step drew probeAt: check its bounds
	prober   *smWaiter // the probe's caller, while it seeks a token
	probeTok *smToken  // the probe's token, while its dial runs
	// probeGrant: the sub-step chose and granted the probe's caller; its
	// choice is checked once the model has seen all the sub-step did.
	probeGrant *smWaiter
	left       *smWaiter // the probe's caller until the sub-step, still waiting
	outages    uint64
	failed     uint64
}

func (c *smCircuit) probing() bool { return c.prober != nil || c.probeTok != nil }

// smProbe is the role of a server's probe timer.
type smProbe struct{ s *server }

// smBackoffBounds are probeBackoff's bounds after failures failed probes,
// written independently: the delay doubles from 50ms up to a second, and
// the jitter takes between half and all of it.
func smBackoffBounds(failures int) (lo, hi time.Duration) {
	d := 50 * time.Millisecond
	for i := 0; i < failures && d < time.Second; i++ {
		d *= 2
	}
	d = min(d, time.Second)
	return d / 2, d
}

// circuitDown is the model of a dial of tk that found the server down.
func (m *stateMachine) circuitDown(tk *smToken) {
	c := &m.circ
	wasProbe := c.probeTok == tk
	if wasProbe {
		c.probeTok = nil
	}
	if !c.down {
		c.down, c.since, c.failures = true, m.clk.Now(), 0
		c.outages++
		c.drawn = true
		m.cov.trips++
		m.logf("the circuit trips")
	}
	if wasProbe {
		c.failures++
		c.drawn = true
		m.cov.probeFailed++
		m.logf("the probe fails: %d failures", c.failures)
	}
}

// circuitUp is the model of a dial of tk that got an answer.
func (m *stateMachine) circuitUp(tk *smToken) {
	c := &m.circ
	wasProbe := c.probeTok == tk
	if wasProbe {
		c.probeTok = nil
	}
	if !c.down {
		return
	}
	if wasProbe {
		m.cov.probeOK++
	}
	c.down, c.failures, c.prober, c.probeTok, c.drawn = false, 0, nil, nil, false
	m.logf("the circuit resets")
	// markUpLocked puts every pool with callers back to the growth rule.
	for _, D := range m.dbs {
		if D.d != nil {
			m.exp.grow = append(m.exp.grow, D)
		}
	}
}

// probeCandidate reports whether sw, the first waiter of its pool, may be
// the probe's caller: its pool below its cap, sw no later than the first of
// any other such pool that has a token free, and if its own pool has none,
// no such pool (startProbeLocked). extra counts a token or a seek of sw's own
// already reflected in its pool's numbers; skip, its token if it was
// granted one. b.mu is held.
func (m *stateMachine) probeCandidate(sw *smWaiter, extra int, skip *smToken) bool {
	D := sw.db
	if m.live(D)+D.d.waiters.seeking-extra >= m.capOf(D) {
		return false
	}
	room := m.roomNow(D, skip)
	for _, x := range m.probeFronts() {
		if x == sw {
			continue
		}
		if xr := m.roomNow(x.db, nil); xr && !room || xr == room && x.since.Before(sw.since) {
			return false
		}
	}
	return true
}

// roomNow is room, with the tokens the budget released in the sub-step
// under way (their owner done, their sockets drained) no longer counted,
// as settle has yet to, nor skip.
func (m *stateMachine) roomNow(D *smDB, skip *smToken) bool {
	open, dOpen, inUse := 0, 0, 0
	per := map[*smDB]int{}
	for _, tk := range m.tokens {
		if tk.released || tk.ended && len(tk.sockets) == 0 || tk == skip {
			continue
		}
		open++
		per[tk.db]++
	}
	for x, n := range per {
		inUse += max(0, n-x.reserved)
	}
	dOpen = per[D]
	return open < m.limit() && (dOpen < D.reserved || inUse < m.limit()-m.reservedSum())
}

// probeFronts lists the first waiter of every pool a probe may start for:
// with callers waiting and below its cap. b.mu is held.
func (m *stateMachine) probeFronts() (out []*smWaiter) {
	for _, D := range m.dbs {
		if D.d == nil {
			continue
		}
		if ws := m.waitersOf(D); len(ws) > 0 && m.live(D)+D.d.waiters.seeking < m.capOf(D) {
			out = append(out, ws[0])
		}
	}
	return out
}

// proberLeft notices the probe's caller leaving the dial queue while it
// still waits: a lowered cap, or it had no token free and another caller
// had one, and took the probe over. handedOver checks why, once the model
// has seen all the sub-step did. b.mu is held.
func (m *stateMachine) proberLeft() {
	sw := m.circ.prober
	if sw == nil || m.byW[sw.w] != sw || sw.w.seeking() || sw.w.done {
		return
	}
	m.circ.prober, m.circ.left = nil, sw
	m.cov.probeHandover++
	m.logf("w%d no longer probes", sw.id)
}

// handedOver checks that sw, the probe's caller until the sub-step, left
// the dial queue for a lowered cap, or for a caller that could get a token
// when sw could not: grant (granted in the sub-step), or the new probe's
// caller. b.mu is held.
func (m *stateMachine) handedOver(sw, grant *smWaiter) {
	D := sw.db
	if m.byW[sw.w] != sw || m.live(D)+D.d.waiters.seeking >= m.capOf(D) {
		return // served meanwhile, or capped
	}
	if sw.w.claim != nil || m.roomNow(D, nil) {
		m.fail("w%d, the probe's caller, stopped seeking though it could get a token", sw.id)
	}
	to, skip := m.circ.prober, (*smToken)(nil)
	if grant != nil {
		to, skip = grant, grant.tok
	}
	if to == nil || to == sw || !m.roomNow(to.db, skip) {
		m.fail("w%d, the probe's caller, stopped seeking with no token free, and no caller with one took the probe over", sw.id)
	}
}

// probeGranted is the model of a grant of tok to sw, in settle before sw
// leaves the model's queue: while the server is down only the probe's
// caller is granted, and its token is the probe. It reports whether tok is
// the probe's.
func (m *stateMachine) probeGranted(sw *smWaiter, tok *token) bool {
	c := &m.circ
	m.b.mu.Lock()
	defer m.b.mu.Unlock()
	m.locked = true
	defer func() { m.locked = false }()
	probe := m.srv().circuit.isProbe(tok)
	m.proberLeft()
	switch {
	case c.prober == sw:
		if !probe {
			m.fail("w%d, the probe's caller, was granted a token that is not the probe", sw.id)
		}
		c.prober = nil
	case probe && c.down && !c.probing():
		// Chosen and granted within the sub-step: check checks the
		// choice once the model has seen all the sub-step did.
		if now := m.clk.Now(); now.Before(c.probeAt) {
			m.fail("w%d probes %s before the backoff ends", sw.id, c.probeAt.Sub(now))
		}
		if ws := m.waitersOf(sw.db); ws[0] != sw {
			m.fail("w%d of %s probes; it is not its pool's first caller", sw.id, sw.db.ws)
		}
		m.circ.probeGrant = sw
		m.cov.probes++
		m.logf("w%d probes", sw.id)
	case probe && c.down:
		m.fail("w%d was granted a probe's token while another probe is under way", sw.id)
	case probe:
		m.fail("w%d was granted a probe's token while the server is up", sw.id)
	case c.down:
		m.fail("w%d of %s was granted a token while the server is down, and it is not the probe", sw.id, sw.db.ws)
	}
	return probe
}

// giveUpDown checks what a caller whose wait ended while the server was
// down gets back.
func (m *stateMachine) giveUpDown(sw *smWaiter, r smResult, now time.Time, timeout bool) *ServerDownError {
	var de *ServerDownError
	if !errors.As(r.err, &de) || !errors.Is(r.err, ErrServerDown) || errors.Is(r.err, ErrBudgetExhausted) || r.be != nil || r.tok != nil {
		m.fail("w%d gave up while the server is down: got %v", sw.id, r.err)
	}
	if !timeout && !errors.Is(r.err, context.Canceled) {
		m.fail("w%d was cancelled while the server is down: %v does not say so", sw.id, r.err)
	}
	if timeout && errors.Is(r.err, context.Canceled) {
		m.fail("w%d timed out while the server is down: %v says it was cancelled", sw.id, r.err)
	}
	D := sw.db
	if de.Workspace != D.ws || de.Database != "db"+D.ws || de.Waited != now.Sub(sw.since) || de.Down != now.Sub(m.circ.since) ||
		de.Err == nil || de.Err.Error() != "connection failed" {
		m.fail("w%d: %+v; the model: waited %s, down %s", sw.id, *de, now.Sub(sw.since), now.Sub(m.circ.since))
	}
	m.circ.failed++
	m.cov.downFails++
	if m.circ.prober == sw {
		// probeEndedLocked(failed=false): no news of the server, so the
		// next probe may start at once.
		m.circ.prober = nil
		m.logf("the probe's caller left")
	}
	return de
}

// probeTimer runs the server's probe timer t, of server s.
func (m *stateMachine) probeTimer(t *smTimer, s *server) {
	m.sub("the probe timer runs", func() {
		b := m.b
		b.mu.Lock()
		due := b.servers[serverKey{}] == s && !m.closed && m.circ.down && !m.circ.probing() &&
			!m.clk.Now().Before(m.circ.probeAt) && len(m.probeFronts()) > 0
		b.mu.Unlock()
		t.f()
		if due && !m.circ.probing() {
			b.mu.Lock()
			started := s.circuit.prober != nil || s.circuit.probing
			b.mu.Unlock()
			if !started {
				m.fail("the probe is due and a caller may dial it, and none started")
			}
		}
	})
}

// checkCircuit compares the budget's circuit with the model's; b.mu is
// held.
func (m *stateMachine) checkCircuit() {
	b := m.b
	s := b.servers[serverKey{}]
	if s == nil {
		m.circ = smCircuit{} // forgotten with its last pool
		return
	}
	c, mc := &s.circuit, &m.circ
	if c.down != mc.down || c.outages != mc.outages || c.failed != mc.failed {
		m.fail("circuit down %v outages %d failed waits %d; the model %v %d %d", c.down, c.outages, c.failed, mc.down, mc.outages, mc.failed)
	}
	if !c.down {
		mc.probeGrant, mc.left = nil, nil
		if c.wake.armed {
			m.fail("the probe timer is armed while the server is up")
		}
		return
	}
	if !c.since.Equal(mc.since) || c.failures != mc.failures {
		m.fail("down since %s after %d failed probes; the model %s, %d", c.since.Sub(smEpoch), c.failures, mc.since.Sub(smEpoch), mc.failures)
	}
	now := m.clk.Now()
	if mc.drawn {
		lo, hi := smBackoffBounds(mc.failures)
		if d := c.probeAt.Sub(now); d < lo || d > hi {
			m.fail("next probe in %s after %d failed probes; the backoff is %s to %s", d, mc.failures, lo, hi)
		}
		mc.probeAt, mc.drawn = c.probeAt, false
	} else if !c.probeAt.Equal(mc.probeAt) {
		m.fail("next probe at %s; the model %s", c.probeAt.Sub(smEpoch), mc.probeAt.Sub(smEpoch))
	}

	grant := mc.probeGrant
	mc.probeGrant = nil
	if grant != nil && !m.probeCandidate(grant, 1, grant.tok) {
		m.fail("w%d of %s probes; it is not the oldest first caller of a pool below its cap with a token free", grant.id, grant.db.ws)
	}
	// The probe's caller, while it seeks a token.
	m.proberLeft()
	if c.prober != mc.prober.waiterOrNil() {
		sw := m.byW[c.prober]
		switch {
		case c.prober == nil:
			m.fail("the budget has no probe's caller; the model has w%d", mc.prober.id)
		case sw == nil || !c.prober.seeking():
			m.fail("the probe's caller is not a seeking waiter the model knows")
		case mc.probing():
			m.fail("w%d probes while another probe is under way", sw.id)
		case now.Before(mc.probeAt):
			m.fail("w%d probes %s before the backoff ends", sw.id, mc.probeAt.Sub(now))
		case m.waitersOf(sw.db)[0] != sw || !m.probeCandidate(sw, 1, nil):
			m.fail("w%d of %s probes; it is not the first caller of a pool below its cap", sw.id, sw.db.ws)
		default:
			mc.prober = sw
			m.cov.probes++
			m.logf("w%d seeks a token to probe", sw.id)
		}
	}
	if sw := mc.left; sw != nil {
		mc.left = nil
		m.handedOver(sw, grant)
	}
	if c.probing != mc.probing() {
		m.fail("circuit probing %v; the model %v (caller %v, token %v)", c.probing, mc.probing(), mc.prober != nil, mc.probeTok != nil)
	}
	// Down: nobody dials but the probe's caller.
	sv := m.srv()
	for w := sv.queue.front; w != nil; w = sv.queue.next(w) {
		if w != c.prober {
			m.fail("w%d of %s seeks a token while the server is down, and it is not the probe's caller", m.byW[w].id, w.db.workspace)
		}
	}
	// Liveness: callers a probe may start for have one coming.
	if !m.closed && !c.probing && len(m.probeFronts()) > 0 {
		at := mc.probeAt
		if at.Before(now) {
			at = now
		}
		ok := false
		if t, is := c.wake.timer.(*smTimer); is {
			tat, active := t.state()
			ok = active && !tat.After(at)
			for _, p := range m.pending {
				ok = ok || p == t
			}
		}
		if !ok {
			m.fail("the server is down, callers wait for a probe, and no probe timer is armed by %s", at.Sub(smEpoch))
		}
	}
}

func (sw *smWaiter) waiterOrNil() *waiter {
	if sw == nil {
		return nil
	}
	return sw.w
}
