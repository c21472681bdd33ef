package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tenantpg/tenantpg/internal/pgtest"
)

// password is the app role's password: distinctive, so that finding it in
// an error, a log line or a stats snapshot cannot be a coincidence.
const password = "tortured-Pa55-q7Zx9kW2"

// world is the server and what the run created on it.
type world struct {
	srv         *pgtest.Server
	role        string
	dbs         []string // full database names, one per workspace
	labels      []string // workspace labels
	restartable bool     // the server was started here, so it can be restarted
}

// startWorld starts a throwaway PostgreSQL (or attaches to DATABASE_URL)
// with a role whose CONNECTION LIMIT is the budget, so the server itself
// refuses any connection beyond it, and o.workspaces databases copied from a
// template holding the table the traffic uses.
func startWorld(ctx context.Context, o options) (*world, error) {
	if u := os.Getenv("DATABASE_URL"); u != "" {
		os.Setenv(pgtest.EnvURL, u)
	}
	// Room above the budget for the harness's admin connections, so that
	// only the role's own limit ever refuses the app.
	srv, err := pgtest.Start(pgtest.Options{MaxConnections: o.budget + 20})
	if err != nil {
		return nil, err
	}
	w := &world{srv: srv, restartable: os.Getenv(pgtest.EnvURL) == ""}
	fail := func(err error) (*world, error) {
		srv.Stop()
		return nil, err
	}
	setup, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	if w.role, err = srv.CreateRole(setup, "app", password, o.budget); err != nil {
		return fail(err)
	}
	tpl, err := srv.CreateDatabases(setup, w.role, "", "tpl")
	if err != nil {
		return fail(err)
	}
	if err := srv.Exec(setup, tpl[0],
		"CREATE TABLE kv (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0, v text NOT NULL)",
		"INSERT INTO kv (id, v) SELECT g, 'v' || g FROM generate_series(1, 10) g",
		"ALTER TABLE kv OWNER TO "+pgtest.QuoteIdent(w.role)); err != nil {
		return fail(err)
	}
	w.labels = make([]string, o.workspaces)
	for i := range w.labels {
		w.labels[i] = fmt.Sprintf("ws_%04d", i)
	}
	if w.dbs, err = srv.CreateDatabases(setup, w.role, tpl[0], w.labels...); err != nil {
		return fail(err)
	}
	return w, nil
}

func (w *world) stop() { w.srv.Stop() }

// dsn is a URL for database db at addr as the app role, labelled for stats.
func (w *world) dsn(addr, db, label string, extra ...string) string {
	u := url.URL{Scheme: "postgres", User: url.UserPassword(w.role, password), Host: addr, Path: "/" + db}
	q := "sslmode=disable&workspace=" + url.QueryEscape(label)
	for _, e := range extra {
		q += "&" + e
	}
	u.RawQuery = q
	return u.String()
}

func (w *world) addr() string { return net.JoinHostPort(w.srv.Host, strconv.Itoa(w.srv.Port)) }

// sockets tracks the sockets a fake server holds so that closing it ends
// every goroutine it started.
type sockets struct {
	mu     sync.Mutex
	open   map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

// add tracks c; it reports false (and closes c) once the owner is closed.
func (s *sockets) add(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		c.Close()
		return false
	}
	if s.open == nil {
		s.open = make(map[net.Conn]struct{})
	}
	s.open[c] = struct{}{}
	return true
}

func (s *sockets) remove(c net.Conn) {
	c.Close()
	s.mu.Lock()
	delete(s.open, c)
	s.mu.Unlock()
}

func (s *sockets) closeAll() {
	s.mu.Lock()
	s.closed = true
	for c := range s.open {
		c.Close()
	}
	s.mu.Unlock()
}

// hungServer accepts connections and never answers: a host whose kernel
// completes the handshake while the service behind it is stuck. A dial to it
// ends only at the caller's deadline, and the driver's drain of the socket
// only at its own timeout, since this end never closes.
type hungServer struct {
	once     sync.Once
	ln       net.Listener
	s        sockets
	accepted atomic.Int64
}

func startHung() (*hungServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	h := &hungServer{ln: ln}
	h.s.wg.Add(1)
	go func() {
		defer h.s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if h.s.add(c) {
				h.accepted.Add(1)
			}
		}
	}()
	return h, nil
}

func (h *hungServer) addr() string { return h.ln.Addr().String() }

func (h *hungServer) close() {
	h.once.Do(func() {
		h.ln.Close()
		h.s.closeAll()
		h.s.wg.Wait()
	})
}

// refusedAddr returns a local address nothing listens on: a port bound and
// released, which the kernel answers with a reset (ECONNREFUSED).
func refusedAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	addr := ln.Addr().String()
	return addr, ln.Close()
}

// slowProxy forwards to the server after a delay set at run time: a dial
// through it takes at least that long (a server slow to accept, a congested
// network) but then works normally. Half-closes are passed on in both
// directions, so that the driver's drain sees the server's end close just as
// it would on a direct connection.
type slowProxy struct {
	once    sync.Once
	ln      net.Listener
	target  string
	delay   atomic.Int64 // nanoseconds
	done    chan struct{}
	s       sockets
	proxied atomic.Int64
}

func startProxy(target string) (*slowProxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &slowProxy{ln: ln, target: target, done: make(chan struct{})}
	p.s.wg.Add(1)
	go func() {
		defer p.s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if !p.s.add(c) {
				return
			}
			p.s.wg.Add(1)
			go p.forward(c)
		}
	}()
	return p, nil
}

func (p *slowProxy) addr() string { return p.ln.Addr().String() }

func (p *slowProxy) setDelay(d time.Duration) { p.delay.Store(int64(d)) }

func (p *slowProxy) forward(c net.Conn) {
	defer p.s.wg.Done()
	defer p.s.remove(c)
	if d := time.Duration(p.delay.Load()); d > 0 {
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-p.done:
			t.Stop()
			return
		}
	}
	up, err := net.DialTimeout("tcp", p.target, 5*time.Second)
	if err != nil {
		return // the server is down: the client sees its connection close, as it would
	}
	if !p.s.add(up) {
		return
	}
	defer p.s.remove(up)
	p.proxied.Add(1)
	back := make(chan struct{})
	go func() {
		defer close(back)
		pipe(up, c)
	}()
	pipe(c, up)
	<-back
}

// pipe copies until src ends and then half-closes dst, so that the other
// direction keeps flowing until its own end.
func pipe(dst, src net.Conn) {
	_, _ = io.Copy(dst, src)
	if tc, ok := dst.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	} else {
		dst.Close()
	}
}

func (p *slowProxy) close() {
	p.once.Do(func() {
		close(p.done)
		p.ln.Close()
		p.s.closeAll()
		p.s.wg.Wait()
	})
}
