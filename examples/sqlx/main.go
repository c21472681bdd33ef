// Command sqlx uses jmoiron/sqlx over tenantpg for a few workspaces through
// one *sqlx.DB: named queries, Select, Get, In expansion and transactions.
// Its DSN names the database with tenantpg's {workspace} placeholder, and
// every call names its workspace in the context (tenantpg.WithWorkspace).
//
// sqlx chooses its placeholder style by driver name, and an unknown name
// such as "tenantpg" gets "?", which PostgreSQL rejects. Either wrap the
// *sql.DB under a name sqlx knows, sqlx.NewDb(db, "pgx"), or register the
// name once, sqlx.BindDriver("tenantpg", sqlx.DOLLAR). This program does the
// second so that sqlx.Open("tenantpg", dsn) works as it does for "pgx".
//
//	go run ./examples/sqlx
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/jmoiron/sqlx"

	"github.com/tenantpg/tenantpg"
	"github.com/tenantpg/tenantpg/examples/internal/demo"
)

func init() {
	// Once per process, before the first sqlx.Open("tenantpg", ...).
	sqlx.BindDriver(tenantpg.DriverName, sqlx.DOLLAR)
}

// Contact is a row of the contacts table every workspace gets.
type Contact struct {
	ID    int64  `db:"id"`
	Email string `db:"email"`
	Name  string `db:"name"`
}

func main() {
	if err := run(context.Background(), 5, 4, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "sqlx:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, workspaces, budget int, out io.Writer) error {
	world, err := demo.Start(ctx, workspaces, budget)
	if err != nil {
		return err
	}
	defer world.Stop()
	if err := tenantpg.Configure(tenantpg.Config{MaxConnections: budget}); err != nil {
		return err
	}
	db, err := sqlx.Open(tenantpg.DriverName, world.RoutedDSN)
	if err != nil {
		return err
	}
	defer db.Close()
	for i, id := range world.Workspaces {
		if err := workspace(tenantpg.WithWorkspace(ctx, id), db, i, out); err != nil {
			return fmt.Errorf("workspace %s: %w", id, err)
		}
	}
	// The same *sqlx.DB, two workspaces alternately from one goroutine:
	// each sees only its own rows.
	for round := 0; round < 2; round++ {
		for i, id := range world.Workspaces {
			var emails []string
			if err := db.SelectContext(tenantpg.WithWorkspace(ctx, id), &emails, `SELECT email FROM contacts ORDER BY email`); err != nil {
				return err
			}
			for _, e := range emails {
				if !strings.HasSuffix(e, fmt.Sprintf("@ws%d.example", i)) {
					return fmt.Errorf("workspace %s holds another workspace's row %q", id, e)
				}
			}
		}
	}
	return nil
}

func workspace(ctx context.Context, db *sqlx.DB, i int, out io.Writer) error {
	db.MustExecContext(ctx, `CREATE TABLE IF NOT EXISTS contacts (id bigserial PRIMARY KEY, email text UNIQUE NOT NULL, name text NOT NULL)`)

	// Named insert from structs.
	people := []Contact{
		{Email: fmt.Sprintf("ada@ws%d.example", i), Name: "Ada"},
		{Email: fmt.Sprintf("grace@ws%d.example", i), Name: "Grace"},
		{Email: fmt.Sprintf("linus@ws%d.example", i), Name: "Linus"},
	}
	if _, err := db.NamedExecContext(ctx, `INSERT INTO contacts (email, name) VALUES (:email, :name)`, people); err != nil {
		return err
	}

	// In expansion, rebound to $n placeholders.
	q, args, err := sqlx.In(`SELECT id, email, name FROM contacts WHERE name IN (?) ORDER BY name`, []string{"Ada", "Linus"})
	if err != nil {
		return err
	}
	var some []Contact
	if err := db.SelectContext(ctx, &some, db.Rebind(q), args...); err != nil {
		return err
	}
	if len(some) != 2 {
		return fmt.Errorf("In: got %d contacts, want 2", len(some))
	}

	// A transaction with Get.
	tx, err := db.BeginTxx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `UPDATE contacts SET name = $1 WHERE email = $2`, "Grace Hopper", people[1].Email); err != nil {
		return err
	}
	var grace Contact
	if err := tx.GetContext(ctx, &grace, `SELECT id, email, name FROM contacts WHERE email = $1`, people[1].Email); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return err
	}
	if grace.Name != "Grace Hopper" {
		return errors.New("transaction: update not visible")
	}

	// Named query with a map.
	rows, err := db.NamedQueryContext(ctx, `SELECT count(*) FROM contacts WHERE name <> :name`, map[string]any{"name": "nobody"})
	if err != nil {
		return err
	}
	var n int
	for rows.Next() {
		if err := rows.Scan(&n); err != nil {
			rows.Close()
			return err
		}
	}
	rows.Close()
	fmt.Fprintf(out, "workspace %d: %d contacts, In matched %d, Grace is now %q\n", i, n, len(some), grace.Name)
	return nil
}
