package tenantpg_test

import (
	"context"
	"log"

	"github.com/tenantpg/tenantpg"
)

// Code that uses pgx directly takes its connections from the same budget as
// database/sql's: OpenPool once per workspace, Acquire and Release per unit
// of work.
func ExampleDriver_OpenPool() {
	pool, err := tenantpg.OpenPool("postgres://app:secret@db:5432/ws_abc?workspace=abc")
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	ctx := context.Background()
	pc, err := pool.Acquire(ctx) // *tenantpg.BudgetError when the budget stays full: answer 503
	if err != nil {
		log.Fatal(err)
	}
	defer pc.Release()
	var n int
	if err := pc.Conn().QueryRow(ctx, "SELECT count(*) FROM kv").Scan(&n); err != nil {
		log.Fatal(err)
	}
}
