package tenantpg

import (
	"context"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// The socket of a backend is tracked from dial to drain, so that its token
// returns only once the server has closed its end.

// drainTimeout bounds how long a closed socket waits for the server to close
// its end. A healthy server closes within a round trip of receiving
// Terminate; past this the token is given back anyway so that an unreachable
// server cannot leak the budget.
const drainTimeout = 3 * time.Second

// tokenKey carries the dialTarget from Connect to trackedDial through the
// dial context: pgx calls DialFunc for every attempt (TLS fallback, several
// hosts) and for cancel requests, and only the first kind belongs to a token.
type tokenKey struct{}

type dialTarget struct {
	b   *budget
	tok *token
}

// trackedDial wraps pgx's dialer so that every socket opened for a token is
// counted, and the token is released only after each one is drained.
func trackedDial(inner pgconn.DialFunc) pgconn.DialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		nc, err := inner(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		t, _ := ctx.Value(tokenKey{}).(*dialTarget)
		if t == nil {
			return nc, nil // a cancel request: no backend is created for it
		}
		s := &trackedConn{Conn: nc, target: t}
		t.b.socketOpened(t.tok, s)
		return s, nil
	}
}

// trackedConn is a socket whose Close waits, in the background, for the
// server to close its end before the token is returned. pgconn's Close sends
// Terminate and closes the socket without waiting, and the backend process
// lingers for a moment after that; a new dial in that moment would make the
// server see one connection more than the budget.
type trackedConn struct {
	net.Conn
	target *dialTarget
	once   sync.Once
	closed atomic.Bool
}

func (s *trackedConn) Close() error {
	s.once.Do(func() {
		s.closed.Store(true)
		s.target.b.drainStarted()
		go s.drain()
	})
	return nil
}

// After Close the drain owns the deadlines: pgconn's context watcher clears
// them when it stops watching, which would leave the drain of a server that
// never answers waiting forever, its token with it.

func (s *trackedConn) SetDeadline(t time.Time) error {
	if s.closed.Load() {
		return nil
	}
	return s.Conn.SetDeadline(t)
}

func (s *trackedConn) SetReadDeadline(t time.Time) error {
	if s.closed.Load() {
		return nil
	}
	return s.Conn.SetReadDeadline(t)
}

func (s *trackedConn) SetWriteDeadline(t time.Time) error {
	if s.closed.Load() {
		return nil
	}
	return s.Conn.SetWriteDeadline(t)
}

func (s *trackedConn) drain() {
	// Half-close first: a server that never got Terminate (the dial was
	// cancelled, pgconn gave up) ends its backend on EOF.
	if hc, ok := s.Conn.(interface{ CloseWrite() error }); ok {
		_ = hc.CloseWrite()
		_ = s.Conn.SetReadDeadline(time.Now().Add(drainTimeout))
		_, _ = io.Copy(io.Discard, s.Conn)
	}
	_ = s.Conn.Close()
	s.target.b.socketDrained(s.target.tok)
}
