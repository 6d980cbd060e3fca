// Command grpcserver serves the standard gRPC health service with graceful
// and gracefulgrpc: unary Check calls never fail across upgrades, and Watch
// streams end with codes.Unavailable ("server restarting") at the drain, so
// clients reconnect to the new process. Every response carries the serving
// PID in the "x-pid" header.
//
//	flags  -addr host:port (default 127.0.0.1:50051), -pidfile path,
//	       -drain-timeout, -goodbye-spread
//	SIGHUP upgrades in place; SIGTERM drains and exits 0.
package main

import (
	"context"
	"flag"
	"log/slog"
	"os"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/graceful-go/graceful"
	"github.com/graceful-go/graceful/gracefulgrpc"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "TCP address to serve on")
	pidfile := flag.String("pidfile", "", "write the PID of the serving process here")
	drain := flag.Duration("drain-timeout", graceful.DefaultDrainTimeout, "hard deadline of a drain")
	spread := flag.Duration("goodbye-spread", 0, "spread the goodbyes of Watch streams over this much of the drain")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := run(graceful.Options{Logger: log, PIDFile: *pidfile, DrainTimeout: *drain, GoodbyeSpread: *spread}, *addr); err != nil {
		log.Error("exiting", "err", err)
		os.Exit(1)
	}
}

func run(opts graceful.Options, addr string) error {
	p, err := graceful.New(opts)
	if err != nil {
		return err
	}
	ln, err := p.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	healthpb.RegisterHealthServer(srv, &health{p: p, pid: strconv.Itoa(os.Getpid())})
	gracefulgrpc.Serve(p, srv, ln)
	return p.Run(context.Background())
}

// health answers SERVING while the process is not draining.
type health struct {
	healthpb.UnimplementedHealthServer
	p   *graceful.Process
	pid string
}

func (h *health) status() healthpb.HealthCheckResponse_ServingStatus {
	select {
	case <-h.p.Draining():
		return healthpb.HealthCheckResponse_NOT_SERVING
	default:
		return healthpb.HealthCheckResponse_SERVING
	}
}

func (h *health) Check(ctx context.Context, _ *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	grpc.SetHeader(ctx, metadata.Pairs("x-pid", h.pid))
	return &healthpb.HealthCheckResponse{Status: h.status()}, nil
}

// Watch sends the status every 100 ms until its goodbye, then ends the
// stream with Unavailable: the client reconnects, to the new process.
func (h *health) Watch(_ *healthpb.HealthCheckRequest, stream healthpb.Health_WatchServer) error {
	ctx := stream.Context()
	stream.SetHeader(metadata.Pairs("x-pid", h.pid))
	goodbye := h.p.Goodbye(ctx)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		if err := stream.Send(&healthpb.HealthCheckResponse{Status: h.status()}); err != nil {
			return err
		}
		select {
		case <-tick.C:
		case <-goodbye:
			return status.Error(codes.Unavailable, "server restarting: reconnect")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
