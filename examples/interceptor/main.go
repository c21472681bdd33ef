// Command interceptor wraps tenantpg with ngrok/sqlmw, the way an
// application adds its own interceptors around the driver: an audit
// interceptor counts statements per workspace (read from the context, as
// tenantpg routes them) and tags each statement with a sqlcommenter-style
// comment, /* workspace='abc' */, so that pg_stat_activity, the server log
// and pg_stat_statements show which workspace sent it.
//
// The wrapper passes ResetSession and IsValid through, so tenantpg still
// checks backends out and in as database/sql uses its handles. Raw and
// tenantpg.PgxConn need tenantpg's own handle and do not work through it.
//
//	go run ./examples/interceptor
package main

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"sync"

	"github.com/ngrok/sqlmw"

	"github.com/tenantpg/tenantpg"
	"github.com/tenantpg/tenantpg/examples/internal/demo"
)

// audit counts statements per workspace and tags them with it.
type audit struct {
	sqlmw.NullInterceptor
	mu     sync.Mutex
	counts map[string]int
}

func (a *audit) tag(ctx context.Context, query string) string {
	ws, ok := tenantpg.WorkspaceFromContext(ctx)
	if !ok {
		return query
	}
	a.mu.Lock()
	a.counts[ws]++
	a.mu.Unlock()
	// Workspace ids are validated by tenantpg; quotes are escaped as
	// sqlcommenter does, so an id cannot end the comment.
	return "/* workspace='" + strings.ReplaceAll(strings.ReplaceAll(ws, `'`, `\'`), "*/", "* /") + "' */ " + query
}

func (a *audit) ConnExecContext(ctx context.Context, c driver.ExecerContext, query string, args []driver.NamedValue) (driver.Result, error) {
	return c.ExecContext(ctx, a.tag(ctx, query), args)
}

func (a *audit) ConnQueryContext(ctx context.Context, c driver.QueryerContext, query string, args []driver.NamedValue) (context.Context, driver.Rows, error) {
	rows, err := c.QueryContext(ctx, a.tag(ctx, query), args)
	return ctx, rows, err
}

func main() {
	if err := run(context.Background(), 3, 2, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "interceptor:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, workspaces, budget int, out io.Writer) error {
	world, err := demo.Start(ctx, workspaces, budget)
	if err != nil {
		return err
	}
	defer world.Stop()
	drv, err := tenantpg.NewDriver(tenantpg.Config{MaxConnections: budget})
	if err != nil {
		return err
	}
	defer drv.Close()
	a := &audit{counts: map[string]int{}}
	name := fmt.Sprintf("tenantpg-audit-%p", a)
	sql.Register(name, sqlmw.Driver(drv, a))
	db, err := sql.Open(name, world.RoutedDSN)
	if err != nil {
		return err
	}
	defer db.Close()

	for round := 0; round < 3; round++ {
		for _, id := range world.Workspaces {
			ctx := tenantpg.WithWorkspace(ctx, id)
			var tagged string
			// The server sees the comment: the query text of this very
			// statement, as pg_stat_activity reports it.
			if err := db.QueryRowContext(ctx, "SELECT query FROM pg_stat_activity WHERE pid = pg_backend_pid()").Scan(&tagged); err != nil {
				return fmt.Errorf("workspace %s: %w", id, err)
			}
			if !strings.HasPrefix(tagged, "/* workspace='"+id+"' */") {
				return fmt.Errorf("workspace %s: the server saw %q", id, tagged)
			}
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	ids := make([]string, 0, len(a.counts))
	for id := range a.counts {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		fmt.Fprintf(out, "workspace %s: %d statements, tagged\n", id, a.counts[id])
	}
	s := drv.Stats()
	fmt.Fprintf(out, "peak %d connections of a budget of %d\n", s.PeakOpen, s.Limit)
	return nil
}
