// Command nethttpserver is what most people write: net/http with Shutdown
// on SIGTERM. A deploy stops it and starts the new binary.
package main

import (
	"context"
	"flag"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/graceful-go/graceful/internal/zdbench"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "")
	pidfile := flag.String("pidfile", "", "")
	flag.Parse()
	stopping := make(chan struct{})
	srv := &http.Server{Addr: *addr, Handler: zdbench.Mux(stopping)}
	srv.RegisterOnShutdown(func() { close(stopping) })
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	errC := make(chan error, 1)
	go func() { errC <- srv.ListenAndServe() }()
	time.Sleep(10 * time.Millisecond) // no readiness signal in plain net/http
	if *pidfile != "" {
		os.WriteFile(*pidfile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644)
	}
	select {
	case <-sig:
	case err := <-errC:
		println(err.Error())
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv.Shutdown(ctx)
}
