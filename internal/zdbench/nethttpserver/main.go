// Command nethttpserver is what most people write: net/http with Shutdown
// on SIGTERM. A deploy stops it and starts the new binary.
package main

import (
	"context"
	"flag"
	"log"
	"net"
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
	srv := &http.Server{Handler: zdbench.Mux(stopping)}
	srv.RegisterOnShutdown(func() { close(stopping) })
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	ln, err := net.Listen("tcp", *addr) // bound before the PID file says it is up
	if err != nil {
		log.Fatal(err)
	}
	errC := make(chan error, 1)
	go func() { errC <- srv.Serve(ln) }()
	if *pidfile != "" {
		os.WriteFile(*pidfile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644)
	}
	select {
	case <-sig:
	case err := <-errC:
		log.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv.Shutdown(ctx)
}
