// Command sqlx uses jmoiron/sqlx over tenantpg for a few workspaces: named
// queries, Select, Get, In expansion and transactions.
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
	for i, dsn := range world.DSNs {
		db, err := sqlx.Open(tenantpg.DriverName, dsn)
		if err != nil {
			return err
		}
		err = workspace(ctx, db, i, out)
		db.Close()
		if err != nil {
			return fmt.Errorf("workspace %s: %w", world.Workspaces[i], err)
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
