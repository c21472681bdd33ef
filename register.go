package tenantpg

import (
	"fmt"
	"net"
	"strconv"
)

// Pools and servers coming and going: a connector registers its pool on
// its server, made on first use; handles, waiters and the connector keep
// the pool's state alive (refs); a pool nothing uses and that holds no
// token is forgotten, and a server with it once it has no pool left, so
// that opening many pools over time does not grow memory.

// owner is what a connector or router (the *sql.DB or Pool behind it)
// knows of its handles: how many are open, and whether it was closed, after
// which they are strays. Guarded by budget.mu.
type owner struct {
	handles int
	closed  bool
}

// registerLocked makes the pool of a parsed DSN, on its server.
func (b *budget) registerLocked(params *dsnParams) (*backendPool, error) {
	key := b.serverKeyLocked(params.server)
	limit := b.limit
	if s := b.servers[key]; s != nil {
		limit = s.ledger.max
	} else if len(b.serverLimits) > 0 {
		limit = b.serverLimitLocked(net.JoinHostPort(key.host, strconv.Itoa(int(key.port))))
	}
	if params.maxConns > limit {
		return nil, &DSNError{Workspace: params.workspace,
			Reason: fmt.Sprintf("pool_max_conns %d exceeds the budget of %d connections", params.maxConns, limit)}
	}
	b.poolIDs++
	p := &backendPool{id: b.poolIDs, name: params.cfg.Database}
	s := b.serverLocked(key)
	p.srv = s
	s.pools.pushBack(p)
	if others := s.ledger.reserved; others+params.reserved > s.ledger.max {
		b.forgetLocked(p)
		return nil, &DSNError{Workspace: params.workspace,
			Reason: fmt.Sprintf("pool_reserved_conns %d does not fit: the budget is %d and other pools reserve %d", params.reserved, s.ledger.max, others)}
	}
	if b.fleet.max > 0 {
		switch {
		case s.lease.coord == nil:
			s.lease.role = params.cfg.User
			s.lease.coord = startFleet(params.cfg, b.fleet, fleetSide{b, s}, b.clock, b.log.Load())
			s.ledger.limit = s.lease.limit(s.ledger.max, b.clock.Now())
		case s.lease.role != params.cfg.User:
			b.forgetLocked(p)
			return nil, &DSNError{Workspace: params.workspace,
				Reason: fmt.Sprintf("the fleet budget on %s is role %q's; this DSN connects as another role (one role per server with a fleet budget)", s.label, s.lease.role)}
		default:
			s.lease.coord.offer(params.cfg) // its password may work where the first DSN's does not
		}
	}
	s.ledger.reserve(&p.tokens, params.reserved)
	p.capOverride = params.maxConns
	p.workspace = params.workspace
	p.resetSession = params.resetSession
	p.refs++ // the connector's
	if params.reserved > 0 {
		// A new reservation is backed at once by closing idle shared
		// backends; busy ones are closed as they are checked in.
		b.shrinkLocked(s)
		b.serveQueueLocked(s)
	}
	return p, nil
}

// retainLocked counts a new handle: of pool p, whose state it keeps alive
// (nil for a router's handle, which keeps none), made by o (nil for one
// that Driver.Open returns, which outlives its connector by design).
// releaseLocked undoes it.
func (b *budget) retainLocked(p *backendPool, o *owner) {
	if p != nil {
		p.refs++
	}
	if o != nil {
		o.handles++
		if o.closed {
			b.strays.count++
		}
	}
}

// releaseHandleLocked undoes retainLocked, when a handle is closed or found
// to be garbage (reclaim.go).
func (b *budget) releaseHandleLocked(p *backendPool, o *owner) {
	if o != nil {
		o.handles--
		if o.closed {
			b.strays.count--
		}
	}
	if p != nil {
		b.unregisterLocked(p)
	}
}

// closeOwnerLocked records that o's *sql.DB or Pool was closed: its handles
// still open are strays from now on. p, if not nil, is o's pool: its idle
// backends are closed now, its busy ones as they are checked in, whatever
// handles are still open.
func (b *budget) closeOwnerLocked(p *backendPool, o *owner) {
	if !o.closed {
		o.closed = true
		b.strays.count += o.handles
	}
	if p != nil {
		p.closed = true
		b.closeIdleLocked(p)
		b.unregisterLocked(p)
	}
}

// unregisterLocked drops a reference to p.
func (b *budget) unregisterLocked(p *backendPool) {
	p.refs--
	if p.refs == 0 {
		// Nothing can check these out any more.
		b.closeIdleLocked(p)
	}
	b.forgetLocked(p)
}

// releaseIfIdleLocked drops the last reference to p, its router's, when p
// holds no backend and has no caller waiting, and reports whether it did.
func (b *budget) releaseIfIdleLocked(p *backendPool) bool {
	if p.refs != 1 || p.tokens.open != 0 {
		return false
	}
	p.refs = 0
	b.forgetLocked(p)
	return true
}

// forgetLocked drops the state of a pool nothing uses and that holds no
// token, so that opening many pools over time does not grow memory.
func (b *budget) forgetLocked(p *backendPool) {
	if s := p.srv; s != nil && p.refs == 0 && p.tokens.open == 0 {
		s.ledger.unreserve(&p.tokens)
		b.releaseServerLocked(p)
		b.serveQueueLocked(s)
	}
}

// serverKeyLocked returns the server a DSN's host and port count against:
// the one Config.ServerAliases names for it, or itself.
func (b *budget) serverKeyLocked(k serverKey) serverKey {
	if len(b.aliases) == 0 {
		return k
	}
	to, ok := b.aliases[net.JoinHostPort(k.host, strconv.Itoa(int(k.port)))]
	if !ok {
		return k
	}
	host, port, _ := net.SplitHostPort(to) // checked by Config.normalize
	p, _ := strconv.ParseUint(port, 10, 16)
	return serverKey{host: host, port: uint16(p)}
}

// serverLocked returns the server of key, made on first use.
func (b *budget) serverLocked(key serverKey) *server {
	s := b.servers[key]
	if s == nil {
		s = newServer(key, b.serverLimitLocked)
		s.circuit.wake.fn = func() { b.probeDue(s) }
		b.servers[key] = s
	}
	return s
}

// releaseServerLocked takes p off its server, and forgets the server once
// no pool is on it.
func (b *budget) releaseServerLocked(p *backendPool) {
	s := p.srv
	p.srv = nil
	s.pools.remove(p)
	// A server with a fleet budget is kept: its coordination session and
	// leases outlive its pools until the driver closes.
	if s.pools.len == 0 && b.servers[s.key] == s && s.lease.coord == nil {
		s.circuit.wake.stop()
		delete(b.servers, s.key)
	}
}
