// Command copy bulk-loads rows into several workspace databases with
// PostgreSQL's COPY, through database/sql and tenantpg: (*sql.Conn).Raw
// hands over the connection and tenantpg.PgxConn returns the *pgx.Conn
// under it, which stays checked out, and is never evicted, until Raw
// returns.
//
//	go run ./examples/copy
package main

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/jackc/pgx/v5"

	"github.com/tenantpg/tenantpg"
	"github.com/tenantpg/tenantpg/examples/internal/demo"
)

func main() {
	if err := run(context.Background(), 4, 10000, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "copy:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, workspaces, rows int, out io.Writer) error {
	world, err := demo.Start(ctx, workspaces, 2)
	if err != nil {
		return err
	}
	defer world.Stop()
	drv, err := tenantpg.NewDriver(tenantpg.Config{MaxConnections: 2})
	if err != nil {
		return err
	}
	defer drv.Close()
	for i, dsn := range world.DSNs {
		n, err := load(ctx, drv, dsn, rows)
		if err != nil {
			return fmt.Errorf("workspace %s: %w", world.Workspaces[i], err)
		}
		fmt.Fprintf(out, "workspace %s: copied %d contacts\n", world.Workspaces[i], n)
	}
	return nil
}

func load(ctx context.Context, drv *tenantpg.Driver, dsn string, rows int) (int64, error) {
	db, err := drv.OpenDB(dsn)
	if err != nil {
		return 0, err
	}
	defer db.Close()
	if _, err := db.ExecContext(ctx, `CREATE TABLE contacts (id int PRIMARY KEY, email text NOT NULL)`); err != nil {
		return 0, err
	}
	conn, err := db.Conn(ctx)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	var copied int64
	err = conn.Raw(func(driverConn any) error {
		pc, err := tenantpg.PgxConn(driverConn)
		if err != nil {
			return err
		}
		copied, err = pc.CopyFrom(ctx, pgx.Identifier{"contacts"}, []string{"id", "email"},
			pgx.CopyFromSlice(rows, func(i int) ([]any, error) {
				return []any{i + 1, fmt.Sprintf("c%d@example.com", i+1)}, nil
			}))
		return err
	})
	if err != nil {
		return 0, err
	}
	var count int64
	if err := conn.QueryRowContext(ctx, `SELECT count(*) FROM contacts`).Scan(&count); err != nil {
		return 0, err
	}
	if count != copied {
		return 0, fmt.Errorf("copied %d rows, table has %d", copied, count)
	}
	return copied, nil
}
