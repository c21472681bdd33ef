package main

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tenantpg/tenantpg"
)

// errKind classifies an error by what caused it, so that the table can say
// which faults produce which errors and which errors nothing explains.
type errKind int

const (
	errBudget   errKind = iota // no token in time: tenantpg.ErrBudgetExhausted
	errKilled                  // the backend died under the caller (57P01, EOF, reset, bad connection)
	errDown                    // the server refused or dropped a new connection (restart: refused, 57P03)
	errRejected                // the server had no slot for the role (53300)
	errHung                    // a dial to the hung host ran out of time (hung workspaces only)
	errRefused                 // a dial to the refusing port (that workspace only)
	errContext                 // the caller's deadline or cancellation (the storm)
	errClosed                  // the *sql.DB was closed under the caller (misuse)
	errOther                   // nothing above: always unexpected
	numKinds
)

var kindNames = [numKinds]string{"budget", "killed", "down", "rejected", "hung", "refused", "context", "closed", "other"}

// wsClass says what a workspace's address leads to.
type wsClass int

const (
	classServer  wsClass = iota // the server, directly or through the slow proxy
	classHung                   // the listener that never answers
	classRefused                // the port nothing listens on
)

// classify names the cause of err. The order matters: a BudgetError may
// wrap the caller's context error, and a refused dial cut short by the
// deadline carries both the refusal and the deadline.
func classify(err error, class wsClass) errKind {
	switch class {
	case classHung:
		return errHung
	case classRefused:
		return errRefused
	}
	var pgErr *pgconn.PgError
	var ce *tenantpg.ConnectError
	msg := err.Error()
	switch {
	case errors.Is(err, tenantpg.ErrServerDown):
		// The caller's deadline passed while it waited for the server to
		// come back.
		return errDown
	case errors.Is(err, tenantpg.ErrBudgetExhausted):
		return errBudget
	case strings.Contains(msg, "sql: database is closed"):
		return errClosed
	case errors.As(err, &pgErr):
		switch pgErr.Code {
		case "53300":
			return errRejected
		case "57P01", "57P02": // admin_shutdown, crash_shutdown: terminated, or the server shutting down
			return errKilled
		case "57P03": // cannot_connect_now: shutting down or starting up
			return errDown
		case "57014": // query_canceled: pgx sent a cancel request for the caller's context
			return errContext
		}
		if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
			return errContext
		}
		return errOther
	case errors.As(err, &ce):
		// A dial that failed for another reason than the server's answer:
		// nothing listening, or the connection dropped during start-up.
		if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
			return errContext
		}
		return errDown
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return errContext
	case errors.Is(err, syscall.ECONNREFUSED):
		return errDown
	case errors.Is(err, driver.ErrBadConn), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE),
		strings.Contains(msg, "conn closed"), strings.Contains(msg, "unexpected EOF"),
		strings.Contains(msg, "terminating connection"):
		return errKilled
	}
	return errOther
}

// phase is what the fault scheduler is doing.
type phase struct {
	fault      faultKind // quiet between faults
	recovering bool      // the fault is over; its margin runs
}

// phaseLog numbers the phases so that an operation can be attributed to
// every phase it overlapped: it reads the number when it starts and when it
// ends, and the latest fault between the two is the one to blame. An
// operation that started before a fault and ended after its margin is
// blamed on it too, which a "fault now?" check at either end would miss.
type phaseLog struct {
	cur atomic.Uint64 // seq<<8 | recovering<<7 | fault
	mu  sync.RWMutex
	log []phase
}

func newPhaseLog() *phaseLog {
	return &phaseLog{log: []phase{{fault: faultQuiet}}}
}

func (l *phaseLog) enter(p phase) {
	l.mu.Lock()
	l.log = append(l.log, p)
	v := uint64(len(l.log)-1)<<8 | uint64(p.fault)
	if p.recovering {
		v |= 1 << 7
	}
	l.cur.Store(v)
	l.mu.Unlock()
}

// now returns a stamp for attribute.
func (l *phaseLog) now() uint64 { return l.cur.Load() }

func (l *phaseLog) current() phase {
	v := l.cur.Load()
	return phase{fault: faultKind(v & 0x7f), recovering: v&(1<<7) != 0}
}

// attribute returns the fault to blame for an operation that ran from stamp
// from to stamp to: the latest fault among the phases in between, or quiet.
func (l *phaseLog) attribute(from, to uint64) faultKind {
	if from == to {
		return faultKind(from & 0x7f)
	}
	l.mu.RLock()
	defer l.mu.RUnlock()
	for s := int(to >> 8); s >= int(from>>8); s-- {
		if f := l.log[s].fault; f != faultQuiet {
			return f
		}
	}
	return faultQuiet
}

const maxSamples = 3

// tally counts operations and errors by the fault they are attributed to.
type tally struct {
	ops        [numFaults]atomic.Int64
	errs       [numFaults][numKinds]atomic.Int64
	total      atomic.Int64
	errTotal   atomic.Int64
	unexpected atomic.Int64
	secretHits atomic.Int64

	mu                sync.Mutex
	samples           [numKinds][]string
	unexpectedSamples []string
	secretSample      string
}

// record counts one operation attributed to fault f. An error is unexpected
// when nothing explains it: no fault window overlapped the operation, or it
// is of no known kind.
func (t *tally) record(f faultKind, op, ws string, class wsClass, err error) {
	t.ops[f].Add(1)
	t.total.Add(1)
	if err == nil {
		return
	}
	k := classify(err, class)
	t.errs[f][k].Add(1)
	t.errTotal.Add(1)
	msg := err.Error()
	secret := strings.Contains(msg, password)
	if secret {
		t.secretHits.Add(1)
	}
	unexpected := f == faultQuiet || k == errOther
	if unexpected {
		t.unexpected.Add(1)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if secret && t.secretSample == "" {
		t.secretSample = "error: " + msg
	}
	line := fmt.Sprintf("[%s] %s %s: %s", faultNames[f], op, ws, msg)
	if unexpected && len(t.unexpectedSamples) < 10 {
		t.unexpectedSamples = append(t.unexpectedSamples, line)
	}
	if len(t.samples[k]) < maxSamples {
		for _, s := range t.samples[k] {
			if s == line {
				return
			}
		}
		t.samples[k] = append(t.samples[k], line)
	}
}

// handle is one workspace's *sql.DB and a statement prepared on it. The
// misuse fault replaces a handle while workers use it, so workers load it
// anew for every operation.
type handle struct {
	label string
	class wsClass
	db    *sql.DB

	mu   sync.Mutex
	stmt *sql.Stmt
}

const selectV = "SELECT v FROM kv WHERE id = $1"

// prepared returns the handle's prepared statement, preparing it on first
// use. database/sql re-prepares it on each connection it runs on, so it keeps
// working across evictions and killed backends.
func (h *handle) prepared(ctx context.Context) (*sql.Stmt, error) {
	h.mu.Lock()
	st := h.stmt
	h.mu.Unlock()
	if st != nil {
		return st, nil
	}
	// Prepared without the lock: it needs a connection, which may take a
	// while, and other workers must not queue behind it without their
	// deadline.
	st, err := h.db.PrepareContext(ctx, selectV)
	if err != nil {
		return nil, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.stmt != nil {
		st.Close()
		return h.stmt, nil
	}
	h.stmt = st
	return st, nil
}

// close closes the statement and the *sql.DB.
func (h *handle) close() {
	h.mu.Lock()
	st := h.stmt
	h.stmt = nil
	h.mu.Unlock()
	if st != nil {
		st.Close()
	}
	h.db.Close()
}

// op is one kind of traffic operation.
type op struct {
	name   string
	weight int
	run    func(ctx context.Context, h *handle, id int) error
}

// ops is the traffic mix: plain queries, transactions that write, a
// statement prepared once per workspace, and pinned connections used
// through pgx natively.
var ops = []op{
	{"query", 40, func(ctx context.Context, h *handle, id int) error {
		var v string
		return h.db.QueryRowContext(ctx, selectV, id).Scan(&v)
	}},
	{"tx", 25, func(ctx context.Context, h *handle, id int) error {
		tx, err := h.db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		var n int64
		if _, err = tx.ExecContext(ctx, "UPDATE kv SET n = n + 1 WHERE id = $1", id); err == nil {
			err = tx.QueryRowContext(ctx, "SELECT n FROM kv WHERE id = $1", id).Scan(&n)
		}
		if err != nil {
			_ = tx.Rollback()
			return err
		}
		return tx.Commit()
	}},
	{"prepared", 20, func(ctx context.Context, h *handle, id int) error {
		st, err := h.prepared(ctx)
		if err != nil {
			return err
		}
		var v string
		return st.QueryRowContext(ctx, id).Scan(&v)
	}},
	{"raw", 15, func(ctx context.Context, h *handle, id int) error {
		c, err := h.db.Conn(ctx)
		if err != nil {
			return err
		}
		defer c.Close()
		return c.Raw(func(dc any) error {
			pc, err := tenantpg.PgxConn(dc)
			if err != nil {
				return err
			}
			var v string
			return pc.QueryRow(ctx, selectV, id).Scan(&v)
		})
	}},
}

func pickOp(r *rand.Rand) *op {
	total := 0
	for i := range ops {
		total += ops[i].weight
	}
	n := r.IntN(total)
	for i := range ops {
		if n < ops[i].weight {
			return &ops[i]
		}
		n -= ops[i].weight
	}
	return &ops[len(ops)-1]
}

// worker runs operations on Zipf-chosen workspaces (a few hot ones, a long
// cold tail) until ctx ends. Each operation has its own deadline, not ctx:
// stopping the run must not turn operations in flight into errors.
func (s *soak) worker(ctx context.Context, id int) {
	r := rand.New(rand.NewPCG(s.o.seed, uint64(id)))
	z := rand.NewZipf(r, 1.1, 1, uint64(len(s.handles)-1))
	for ctx.Err() == nil {
		h := s.handles[z.Uint64()].Load()
		o := pickOp(r)
		s.do(o.name, h, func(octx context.Context) error { return o.run(octx, h, 1+r.IntN(10)) }, s.o.opTimeout)
	}
}

// do runs one operation with its own deadline and records it.
func (s *soak) do(name string, h *handle, f func(ctx context.Context) error, timeout time.Duration) error {
	from := s.phases.now()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	err := f(ctx)
	cancel()
	s.tally.record(s.phases.attribute(from, s.phases.now()), name, h.label, h.class, err)
	if s.o.maxOps > 0 && s.tally.total.Load() >= s.o.maxOps {
		s.stopTraffic()
	}
	return err
}
