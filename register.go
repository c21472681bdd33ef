package tenantpg

import (
	"net"
	"strconv"
)

// owner is what a connector or router (the *sql.DB or Pool behind it)
// knows of its handles: how many are open, and whether it was closed, after
// which they are strays. Guarded by budget.mu.
type owner struct {
	handles int
	closed  bool
}

func (b *budget) unregisterLocked(d *backendPool) {
	d.refs--
	if d.refs == 0 {
		// Nothing can check these out any more.
		b.closeIdleLocked(d)
	}
	b.forgetLocked(d)
}

// forgetLocked drops the state of a database nothing uses and that holds no
// backend, so that opening many databases over time does not grow memory.
func (b *budget) forgetLocked(d *backendPool) {
	if _, listed := b.dbs[d]; listed && d.refs == 0 && d.open == 0 {
		s := d.srv
		s.reserved -= d.reserved
		d.reserved = 0
		delete(b.dbs, d)
		b.releaseServerLocked(d)
		b.serveQueueLocked(s)
	}
}

// serverLocked returns the circuit of key, made on first use.
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

func (b *budget) serverLocked(key serverKey) *server {
	s := b.servers[key]
	if s == nil {
		s = &server{key: key, label: net.JoinHostPort(key.host, strconv.Itoa(int(key.port)))}
		s.max = b.serverLimitLocked(s.label)
		s.limit = s.max
		s.pace.slots = initialDialSlots
		s.wake.fn = func() { b.probeDue(s) }
		b.servers[key] = s
	}
	s.refs++
	return s
}

// releaseServerLocked drops d's reference to its server, and the server's
// state once no database uses it.
func (b *budget) releaseServerLocked(d *backendPool) {
	s := d.srv
	if s == nil {
		return
	}
	d.srv = nil
	s.refs--
	// A server with a fleet budget is kept: its coordination session and
	// leases outlive its databases until the driver closes.
	if s.refs == 0 && b.servers[s.key] == s && s.fleet == nil {
		s.wake.stop()
		delete(b.servers, s.key)
	}
}
