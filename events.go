package tenantpg

import (
	"log/slog"
	"time"
)

// What the budget logs. Nothing under budget.mu logs: a transition queues
// an event (eventLocked), and unlock logs the queued events once the lock
// is released and the queued closes have run. The only other log lines are
// the fleet coordinator's (fleet.go), written from its own goroutine and
// under no lock.

type eventKind uint8

const (
	evServerDown   eventKind = iota // a dial found a server down
	evServerUp                      // a server answered again
	evDialFailed                    // a dial failed
	evRejected                      // the server refused a dial for lack of slots
	evExhausted                     // a caller's wait ended without a backend
	evLeak                          // a backend held longer than the leak threshold
	evLeakReturned                  // a backend reported as a leak was checked in
	evAbandoned                     // the handle holding a backend became garbage
)

// event is something to log, queued under budget.mu.
type event struct {
	kind      eventKind
	workspace string
	server    string
	held      time.Duration // evLeak, evLeakReturned, evAbandoned; downFor for evServerUp
	threshold time.Duration // evLeak
	err       error         // evServerDown, evDialFailed, evRejected
	stack     []uintptr     // evLeak, evAbandoned: symbolized only when logged
	exhausted *BudgetError  // evExhausted
}

// eventLocked queues e for unlock to log, when there is a logger.
func (b *budget) eventLocked(e event) {
	if b.log.Load() != nil {
		b.events = append(b.events, e)
	}
}

// log writes e to l.
func (e *event) log(l *slog.Logger) {
	ws := slog.String("workspace", e.workspace)
	switch e.kind {
	case evServerDown:
		attrs := []slog.Attr{slog.String("server", e.server), ws}
		if e.err != nil {
			attrs = append(attrs, slog.String("error", e.err.Error()))
		}
		l.LogAttrs(bg, slog.LevelWarn, "tenantpg: server down: callers wait while one probe at a time dials it", attrs...)
	case evServerUp:
		l.LogAttrs(bg, slog.LevelInfo, "tenantpg: server up", slog.String("server", e.server), slog.Duration("downFor", e.held))
	case evDialFailed, evRejected:
		msg := "tenantpg: dial failed"
		if e.kind == evRejected {
			msg = "tenantpg: server rejected a connection: no connection slot left (SQLSTATE 53300)"
		}
		attrs := []slog.Attr{ws}
		if e.err != nil {
			attrs = append(attrs, slog.String("error", e.err.Error()))
		}
		l.LogAttrs(bg, slog.LevelWarn, msg, attrs...)
	case evExhausted:
		x := e.exhausted
		l.LogAttrs(bg, slog.LevelWarn, "tenantpg: connection budget exhausted",
			slog.String("workspace", x.Workspace), slog.Duration("waited", x.Waited), slog.Int("open", x.Open),
			slog.Int("limit", x.Limit), slog.Int("databaseOpen", x.DatabaseOpen), slog.Int("waiting", x.Waiting),
			slog.Bool("callerContextEnded", x.Err != nil))
	case evLeak:
		attrs := []slog.Attr{ws, slog.Duration("held", e.held), slog.Duration("threshold", e.threshold)}
		if len(e.stack) > 0 {
			attrs = append(attrs, slog.String("stack", formatStack(e.stack)))
		}
		l.LogAttrs(bg, slog.LevelWarn, "tenantpg: connection held longer than the leak threshold (a *sql.Rows, *sql.Conn or *sql.Tx not closed?)", attrs...)
	case evLeakReturned:
		l.LogAttrs(bg, slog.LevelInfo, "tenantpg: a connection reported as a suspected leak was returned", ws, slog.Duration("held", e.held))
	case evAbandoned:
		attrs := []slog.Attr{ws, slog.Duration("held", e.held)}
		if len(e.stack) > 0 {
			attrs = append(attrs, slog.String("stack", formatStack(e.stack)))
		}
		l.LogAttrs(bg, slog.LevelWarn,
			"tenantpg: closed a connection whose *sql.Rows, *sql.Conn, *sql.Tx or tenantpg.PoolConn was dropped without being closed or released", attrs...)
	}
}

// logClosing logs, at debug level, the backends unlock is about to close.
func logClosing(l *slog.Logger, jobs []closeJob) {
	if l == nil || !l.Enabled(bg, slog.LevelDebug) {
		return
	}
	workspaces := make([]string, len(jobs))
	for i, j := range jobs {
		workspaces[i] = j.workspace
	}
	l.LogAttrs(bg, slog.LevelDebug, "tenantpg: closing backends",
		slog.String("reason", reasonNames[jobs[0].reason]), slog.Int("count", len(jobs)), slog.Any("workspaces", workspaces))
}
