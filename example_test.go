package graceful_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"

	"github.com/graceful-go/graceful"
)

// A server serves until its context ends, then drains. Signal handling is
// turned off here; by default SIGHUP upgrades and SIGTERM/SIGINT drain.
func Example() {
	p, err := graceful.New(graceful.Options{
		DrainTimeout:   5 * time.Second,
		UpgradeSignals: []os.Signal{}, // none
		DrainSignals:   []os.Signal{}, // none
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	ln, err := p.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println(err)
		return
	}
	mux := http.NewServeMux()
	mux.Handle("GET /readyz", p.Health().Readiness())
	p.Serve(&http.Server{Handler: mux}, ln)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	<-p.Ready()
	fmt.Println("phase:", p.Phase())

	resp, err := http.Get("http://" + ln.Addr().String() + "/readyz")
	if err != nil {
		fmt.Println(err)
		return
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	fmt.Printf("%s %s", resp.Status, body)

	cancel() // like SIGTERM: drain and return
	fmt.Println("Run returned:", <-done)
	fmt.Println("phase:", p.Phase())
	// Output:
	// phase: serving
	// 200 OK ok
	// Run returned: <nil>
	// phase: done
}
