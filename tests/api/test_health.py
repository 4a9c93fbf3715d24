from __future__ import annotations


def test_health_reports_database_and_redis(client, redis):
    response = client.get("/api/v1/health")
    assert response.status_code == 200
    assert response.json == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}


def test_api_errors_are_problem_json(client):
    response = client.get("/api/v1/no-such-thing")
    assert response.status_code == 404
    assert response.mimetype == "application/problem+json"
    assert response.json["status"] == 404
    assert response.json["title"] == "Not Found"
    response = client.post("/api/v1/health")
    assert response.status_code == 405
    assert response.mimetype == "application/problem+json"
